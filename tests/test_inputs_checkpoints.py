"""Inputs every stage must agree on (micro-batch splitting, fingerprints, randomness) and checkpoints
a user can rely on (atomic overwrite, consolidation into one ordinary Lightning checkpoint)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import OrderedDict, namedtuple
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lightning_paci import checkpoint
from lightning_paci.batches import split_batch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "pipeline_script.py"


def test_split_batch_splits_per_sample_lists_with_the_tensors():
    """A collated batch of (tokens, texts, ids): every micro-batch gets its own samples' strings."""
    extra = {"id": list(range(10)), "lang": "en", "mask": torch.ones(10, 2), "t": torch.tensor(1.0)}
    batch = (torch.arange(10), [f"text{i}" for i in range(10)], extra)
    parts = split_batch(batch, 4, exact=False)
    assert [p[0].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    for x, texts, extra in parts:
        assert texts == [f"text{i}" for i in x.tolist()]
        assert extra["id"] == x.tolist() and extra["lang"] == "en" and extra["mask"].shape == (len(x), 2)
        assert extra["t"].item() == 1.0
    Pair = namedtuple("Pair", "x names")
    (a, b) = split_batch(OrderedDict(p=Pair(torch.arange(4), list("abcd"))), 2, exact=True)
    assert isinstance(a, OrderedDict) and isinstance(a["p"], Pair)
    assert a["p"].names == ["a", "b"] and b["p"].names == ["c", "d"]
    assert split_batch([list("abcd")], 2, exact=True) == [[["a", "b"]], [["c", "d"]]]  # no tensors at all


def test_split_batch_refuses_a_list_it_cannot_split():
    with pytest.raises(ValueError,
                       match=r"batch\[1\] is a list of 3 entries without tensors, but the batch has 4"):
        split_batch((torch.zeros(4, 2), ["a", "b", "c"]), 2, exact=True)


# -- every stage reads the same samples and draws the same random numbers (multi-process) -----------------
def _script(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--timeout", "30", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_stages_reading_different_batches_fail_naming_the_cause(tmp_path):
    """use_distributed_sampler=False, shuffle=True, no seed: each process shuffles its own way."""
    start = time.monotonic()
    proc = _script(tmp_path, "--unseeded-shuffle", "--steps", "4")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "stage 1 and stage 0 read different samples for micro-batch 0 of training batch 0" in out
    assert "use_distributed_sampler=False" in out and "split_dataset_by_node" in out
    assert time.monotonic() - start < 60, "the job should end on the mismatch, not on a timeout"
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a stage process was left running"


def test_randomness_drawn_in_training_step_is_the_same_on_every_stage(tmp_path):
    """Stage 0 masks the inputs, the last stage the labels, with the mask each drew; dropout runs on
    both stages and draws on stage 0 only while stage 1 is still in its meta prefix."""
    proc = _script(tmp_path, "--masking", "--dropout", "0.1", "--steps", "6", "--schedule", "paci")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    draws = [json.loads((tmp_path / f"draws_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(draws[0]) == 6 * 4 and draws[0] == draws[1]
    assert len({tuple(d) for d in draws[0]}) == len(draws[0])  # a new draw for every micro-batch


# -- an overwritten checkpoint is never lost ------------------------------------------------------------
class _Crash(Exception):
    pass


def _save(path: Path, step: int) -> None:
    checkpoint.save(path, 0, 0, {"w": torch.full((3,), float(step))}, None, {"schedulers": [], "version": step},
                    {"global_step": step}, barrier=lambda: None)


def _saved_step(path: Path) -> int:
    step = checkpoint.read_meta(path)["global_step"]
    state = {"model/w": torch.zeros(3)}
    dcp.load(state, checkpoint_id=path)
    assert state["model/w"].tolist() == [float(step)] * 3, "a directory that is not the checkpoint it claims"
    return step


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("crash_at", range(1, 6))
def test_overwrite_killed_at_any_point_keeps_a_complete_checkpoint(tmp_path, monkeypatch, crash_at):
    """The overwrite's file operations (remove a stale aside copy, old -> aside, new -> place, remove
    the aside copy) each interrupted; 5 = interrupted half-way through deleting the aside copy."""
    path = tmp_path / "last.ckpt"
    _save(path, 1)
    ops, rename, remove, swap = [0], Path.rename, checkpoint._remove, checkpoint._swap_into_place

    def step(partial: Path | None = None) -> None:
        ops[0] += 1
        if ops[0] == min(crash_at, 4):
            if crash_at == 5 and partial is not None and partial.is_dir():
                next(p for p in partial.iterdir() if p.is_file()).unlink()  # rmtree got this far
            raise _Crash

    def crashing_swap(tmp: Path, target: Path) -> None:
        with monkeypatch.context() as m:
            m.setattr(Path, "rename", lambda self, to: (step(), rename(self, to))[1])
            m.setattr(checkpoint, "_remove", lambda p: (step(p), remove(p)))
            swap(tmp, target)

    monkeypatch.setattr(checkpoint, "_swap_into_place", crashing_swap)
    with pytest.raises(_Crash):
        _save(path, 2)
    monkeypatch.setattr(checkpoint, "_swap_into_place", swap)
    checkpoint.recover_all(tmp_path)  # what the next run does before it looks for "last"
    assert _saved_step(path) == (1 if crash_at <= 3 else 2)
    assert not list(tmp_path.glob("*.aside"))
    _save(path, 3)  # and the next save works from there
    assert _saved_step(path) == 3 and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_real_kill_between_renames_then_resume_from_last(tmp_path):
    """Rank 0 SIGKILLed as it renames the second last.ckpt into place; ckpt_path="last" then resumes
    from the first (step 2), not from scratch."""
    first, second, ckpt = tmp_path / "first", tmp_path / "second", tmp_path / "ckpt"
    first.mkdir(), second.mkdir()
    common = ["--schedule", "paci", "--steps", "6", "--epoch-batches", "2", "--ckpt-dir", str(ckpt), "--save-last"]
    killed = _script(first, *common, "--kill-at-swap", "2", "--start-method", "fork")
    assert killed.returncode != 0
    assert not (ckpt / "last.ckpt").exists() and (ckpt / "last.ckpt.aside" / "meta.pt").is_file()
    resumed = _script(second, *common, "--resume", "last", "--record-batches")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert json.loads((second / "result.json").read_text())["global_step"] == 6
    assert len(json.loads((second / "batches_rank0.json").read_text())) == 4  # steps 3..6 only
    assert (ckpt / "last.ckpt" / "meta.pt").is_file() and not (ckpt / "last.ckpt.aside").exists()


# -- one ordinary Lightning checkpoint of the whole model ------------------------------------------------
def test_consolidated_checkpoint_loads_with_load_from_checkpoint_and_gives_the_trained_outputs(tmp_path):
    import lightning_paci
    from tests.models import LitTiny, loader

    run = tmp_path / "run"
    run.mkdir()
    proc = _script(run, "--steps", "4", "--epoch-batches", "2", "--ckpt-dir", str(tmp_path / "ckpt"),
                   "--save-hparams", "--sched")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    directory = tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
    with pytest.raises(IsADirectoryError, match=r"lightning_paci.consolidate\("):
        LitTiny.load_from_checkpoint(directory)  # what users try first
    out = lightning_paci.consolidate(directory, tmp_path / "model.ckpt")
    plain = torch.load(out, weights_only=True)  # nothing but tensors and primitive types
    assert plain["global_step"] == 4 and "optimizer_states" not in plain and "pipeline" not in plain
    loaded = LitTiny.load_from_checkpoint(out)  # Lightning's default weights_only, hyperparameters from out
    trained = LitTiny(dtype=torch.float64)  # the processes' own parameters at the end of fit (step 4)
    trained.load_state_dict({k: v for f in run.glob("stage*.pt") for k, v in torch.load(f).items()})
    assert loaded.model.lm_head.weight.dtype == torch.float64
    x, _ = next(iter(loader(8)))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), trained.model(x), rtol=0, atol=0)


def test_dropout_masks_differ_between_stages_while_training_step_draws_agree():
    """In-process, both stages' views of one forward under the same shared seed: the mask drawn in
    training_step is equal, the first dropout mask each stage's own modules draw is not (without
    the stage-private seed at the stage's first module, stage 1's equals stage 0's)."""
    from torch import nn

    from lightning_paci.hollow import StageView
    from lightning_paci.inputs import SharedRandomness
    from lightning_paci.partition import partition_model
    from tests.models import RandomMasking, loader

    batch, drawn, dropped = next(iter(loader(2))), {}, {}
    for stage in (0, 1):
        torch.manual_seed(stage)  # the processes' own generators differ
        model = RandomMasking(dropout=0.5)
        partition = partition_model(model, 2)
        view = StageView(model, dict(zip(partition.units, partition.stage_of)), stage, 2)
        masks = []
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.register_forward_hook(lambda m, i, out: None if out.is_meta else masks.append(out == 0))
        entry = model.get_submodule(view.entry) if view.entry else None
        received = [torch.randn(2, 8, 16)] if stage else []
        with SharedRandomness(123, stage, torch.device("cpu"), entry).forward(0, 7):
            view.run(lambda: model.training_step(batch, 0), received)
        drawn[stage], dropped[stage] = model.draws, masks[0]
    assert drawn[0] == drawn[1]
    assert not torch.equal(dropped[0], dropped[1])
