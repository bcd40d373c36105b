"""Pipeline checkpoints with torch.distributed.checkpoint (DCP): every stage writes its own tensors.

A checkpoint is a directory::

    model/<name>            each stage's parameters and buffers, under the user's own names
    optim/<name>/<state>    optimizer state (exp_avg, ...) per parameter, by name
    meta.pt                 Lightning's checkpoint without tensors, plus the pipeline layout (rank 0)
    stage<i>.pt             stage i's optimizer param groups, LR scheduler state (each stage)

Tensor keys do not mention stages, so together they form the ordinary model. Saving writes
``<dir>.tmp`` and renames it into place only after every stage has finished, so an interrupted save
never leaves a directory that looks complete. Overwriting never leaves the path without a complete
checkpoint that ``recover`` cannot restore: the old copy is renamed aside (``<dir>.aside``), the
new one renamed into place, and only then is the old one deleted (``_swap_into_place``).
``recover`` runs before a path is read (and, for ``ckpt_path="last"``, on the checkpoint
directories before the stage processes start): an aside copy without its replacement goes back.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from lightning_paci._registration import META_FILE


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """``optimizer.state_dict()`` with parameter indices replaced by parameter names.

    Not torch.distributed.checkpoint.state_dict's ``get_optimizer_state_dict``/``set_optimizer_state_dict``
    (tried, torch 2.13): they name an optimizer's parameters through ``model.named_parameters()`` by
    identity, and the optimizer holds aliases (runtime.alias_parameters), so they fail (KeyError 0);
    and on an optimizer with no state yet they run a zero-lr ``step()`` to create it, which on the live
    optimizer would count one Adam step too many when a checkpoint is saved before the first step.
    """
    state = optimizer.state_dict()
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[i]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def load_optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str],
                                 saved: dict[str, Any]) -> None:
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    state = {index[n]: s for n, s in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def parameter_names(module: nn.Module, aliases: list[tuple[nn.Parameter, nn.Parameter]]) -> dict[int, str]:
    """Optimizer alias (by id) -> the user's parameter name (runtime.alias_parameters makes the aliases)."""
    named = {id(p): n for n, p in module.named_parameters()}
    return {id(alias): named[id(param)] for param, alias in aliases}


def layout_of(split: Any, schedule: str) -> dict[str, Any]:
    """What a checkpoint records of the pipeline (a ``partition.Partition`` and its schedule), and what a
    resume must match (``check_layout``)."""
    return {"n_stages": split.n_stages, "schedule": schedule,
            "units": [split.stage_units(i) for i in range(split.n_stages)]}


def save_stage(path: Path, stage: int, rank: int, checkpoint: dict[str, Any], layout: dict[str, Any],
               schedulers: list[Any], version: int, barrier: Any, replica: int = 0) -> None:
    """Collective: write Lightning's ``checkpoint`` dict, every stage its own share (see ``save``). With
    data-parallel replicas (identical copies) replica 0 writes each stage's share; the others take part
    in the collective writing nothing."""
    model_state = checkpoint.pop("state_dict")
    optimizer_states = checkpoint.pop("optimizer_states", None)
    writes = replica == 0
    if not writes:
        model_state, optimizer_states = {}, None
    meta = {**checkpoint, "pipeline": layout}
    stage_state = {"schedulers": [c.scheduler.state_dict() for c in schedulers], "version": version}
    save(path, stage, rank, model_state, optimizer_states[0] if optimizer_states else None, stage_state, meta,
         barrier, writes)


def load_stage(path: Path, stage: int, layout: dict[str, Any], module: nn.Module,
               optimizer: torch.optim.Optimizer | None, names: dict[int, str], schedulers: list[Any],
               weights_only: bool | None = None) -> tuple[dict[str, Any], int]:
    """Load this stage's share in place (model, optimizer, schedulers); returns Lightning's dict without
    tensors and the stage's optimizer version. The layout must match the one saved."""
    meta = read_meta(path, weights_only)
    saved = meta.pop("pipeline")
    check_layout(path, saved, layout)
    stage_state = load(path, stage, module, optimizer, names, weights_only)
    for config, state in zip(schedulers, stage_state["schedulers"]):
        config.scheduler.load_state_dict(state)
    return meta, stage_state["version"]


def check_layout(path: Any, saved: dict[str, Any], layout: dict[str, Any]) -> None:
    """Resume only with the stages and split saved; warn when the schedule changed."""
    if saved["n_stages"] != layout["n_stages"] or saved["units"] != layout["units"]:
        raise ValueError(f"{path} was saved by {saved['n_stages']} stages split as {saved['units']}; this run "
                         f"has {layout['n_stages']} stages split as {layout['units']}. Resume with the same "
                         "stages/split_points (resharding comes in a later release)")
    if saved.get("schedule") != layout["schedule"]:
        rank_zero_warn(f"{path} was saved by a {saved.get('schedule')!r} run and this run resumes it with "
                       f"schedule={layout['schedule']!r}: weights and optimizer state carry over, but the "
                       "schedule changed (PACI's updates cross in-flight micro-batches, flush schedules' do not)")


def gather_full_state_dict(own: dict[str, Tensor], rank: int, world_size: int) -> dict[str, Tensor] | None:
    """Collective: every stage's tensors, on CPU, on global rank 0; None elsewhere."""
    own = {k: v.detach().cpu() for k, v in own.items()}
    parts: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(own, parts, dst=0)
    if parts is None:
        return None
    return {k: v for part in parts for k, v in part.items()}


def save(path: Path, stage: int, rank: int, model_state: dict[str, Tensor],
         optimizer_state: dict[str, Any] | None, stage_state: dict[str, Any], meta: dict[str, Any],
         barrier: Any, writes: bool = True) -> None:
    """Collective: every stage calls it with its own states; rank 0 also writes ``meta``. A rank with
    ``writes=False`` (a replica of a stage another rank writes) takes part and writes nothing."""
    tmp = path.with_name(path.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    tensors: dict[str, Any] = {f"model/{k}": v for k, v in model_state.items()}
    groups = None
    if optimizer_state is not None:
        for name, per_param in optimizer_state["state"].items():
            for key, value in per_param.items():
                tensors[f"optim/{name}/{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
        groups = optimizer_state["param_groups"]
    dcp.save(tensors, checkpoint_id=tmp)
    if writes:
        torch.save({**stage_state, "param_groups": groups}, tmp / f"stage{stage}.pt")
    if rank == 0:
        torch.save(meta, tmp / META_FILE)
    barrier()
    if rank == 0:
        _swap_into_place(tmp, path)
    barrier()


def _aside(path: Path) -> Path:
    return path.with_name(path.name + ".aside")


def _swap_into_place(tmp: Path, path: Path) -> None:
    """``tmp`` becomes ``path``. A crash at any point leaves a complete checkpoint at ``path`` or at
    its aside name (``recover`` puts that back), never neither."""
    aside = _aside(path)
    if path.exists():
        _remove(aside)  # left by a crash after a swap completed: stale, since path is complete
        path.rename(aside)
    tmp.rename(path)
    _remove(aside)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def recover(path: Path) -> None:
    """Undo an overwrite interrupted between its renames: put the aside copy back if ``path`` is
    missing, drop it if ``path`` is there. Safe to call from several processes at once."""
    aside = _aside(path)
    if not aside.exists():
        return
    if path.exists():
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        aside.rename(path)
    except OSError:  # another process put it back first
        pass


def recover_all(directory: Path) -> None:
    """``recover`` every checkpoint of a directory that an interrupted overwrite left aside."""
    if directory.is_dir():
        for aside in directory.glob("*.aside"):
            recover(aside.with_name(aside.name[: -len(".aside")]))


def recover_checkpoint_dirs(trainer: Any) -> None:
    """``recover_all`` in every ModelCheckpoint's directory, where ``ckpt_path="last"`` looks: before
    the stage processes start, since each resolves "last" itself before the strategy reads a file."""
    for callback in trainer.checkpoint_callbacks:
        try:  # the directory ModelCheckpoint._find_last_checkpoints lists (private, name-mangled)
            directory = callback.dirpath or callback._ModelCheckpoint__resolve_ckpt_dir(trainer)
        except Exception:
            continue
        recover_all(Path(directory))


def read_meta(path: Path, weights_only: bool | None = None) -> dict[str, Any]:
    """Lightning's checkpoint dict without tensors; ``weights_only`` as Lightning passes it (None:
    torch's default, True since torch 2.6), for this file and the stages' ``stage<i>.pt``."""
    recover(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a lightning_paci checkpoint directory (no {META_FILE}); "
                                "pipeline checkpoints are directories written by PACIStrategy")
    return torch.load(path / META_FILE, weights_only=weights_only)


def consolidate(path: str | Path, out: str | Path) -> Path:
    """Write the pipeline checkpoint directory ``path`` as one ordinary Lightning checkpoint file ``out``.

    ``out`` holds the whole model's ``state_dict`` under the user's names, the hyperparameters and
    Lightning's progress (epoch, global_step), so ``MyModule.load_from_checkpoint(out)`` gives the
    trained model on one device; it loads with ``weights_only=True``. The stages' optimizer and LR
    scheduler states are left out (their layout is per stage): resume training from the directory.
    Built on torch.distributed.checkpoint's own converter (``dcp_to_torch_save``); needs memory for
    the whole model and its optimizer state; runs in one process, no process group.
    """
    path, out = Path(path), Path(out)
    meta = read_meta(path, weights_only=True)
    meta.pop("pipeline", None)
    with tempfile.TemporaryDirectory() as scratch:
        flat = Path(scratch) / "flat.pt"
        dcp_to_torch_save(path, flat)
        tensors = torch.load(flat, weights_only=True)
    meta["state_dict"] = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    for key in ("optimizer_states", "lr_schedulers"):
        meta.pop(key, None)
    torch.save(meta, out)
    return out


def load(path: Path, stage: int, module: nn.Module, optimizer: torch.optim.Optimizer | None,
         names: dict[int, str], weights_only: bool | None = None) -> dict[str, Any]:
    """Load this stage's tensors in place (and its optimizer); returns its ``stage<i>.pt`` dict."""
    own = {k: v for k, v in module.state_dict().items() if not v.is_meta}
    tensors: dict[str, Any] = {f"model/{k}": v for k, v in own.items()}
    stage_state = torch.load(path / f"stage{stage}.pt", weights_only=weights_only)
    if optimizer is not None and stage_state["param_groups"] is not None:
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        mine = set(names.values())
        for key, info in stored.items():
            if key.startswith("optim/") and key[len("optim/"): key.rindex("/")] in mine:
                tensors[key] = torch.empty(info.size, dtype=info.properties.dtype)
    dcp.load(tensors, checkpoint_id=path)
    for key, value in tensors.items():
        if key.startswith("model/"):
            own[key[len("model/"):]].copy_(value)  # DCP loads in place; copy is a no-op safeguard
    if optimizer is not None and stage_state["param_groups"] is not None:
        state: dict[str, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                name, field = key[len("optim/"): key.rindex("/")], key[key.rindex("/") + 1:]
                state.setdefault(name, {})[field] = value
        load_optimizer_state_by_name(optimizer, names, {"state": state,
                                                        "param_groups": stage_state["param_groups"]})
    return stage_state
