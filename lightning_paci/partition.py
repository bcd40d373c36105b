"""Splitting an ordinary LightningModule into pipeline stages, as data: module names per stage.

The partitioner needs no tracing. It finds the *trunk*, the ``nn.ModuleList``/``nn.Sequential``
with the most parameters (the transformer blocks of a nanoGPT-style model, or a plain
``nn.Sequential`` itself), and lists the model's *units* in registration order: every module on the
path from the root to the trunk is replaced by its children, the trunk by its blocks. For nanoGPT::

    transformer.wte, transformer.wpe, transformer.drop, transformer.h.0 ... transformer.h.11,
    transformer.ln_f, lm_head

A stage is a contiguous run of units. Automatic partitions cut only in front of a trunk block or
right after the trunk (so the last stage may be just the final norm and the head); the input of the
first unit of a stage is what its previous stage sends. ``split_points`` names the units where
stages 1..N-1 begin (torch.distributed.pipelining's ``SplitPoint.BEGINNING``) and may cut anywhere:
with split_points the units come from expanding every ancestor of a split point (any module tree,
no trunk needed: ``split_points=["net.fc1"]`` on a model holding ``net.conv1 ... net.fc2``).

*Shared* units have no parameters and no persistent buffers (dropout, activations, a rotary
embedding whose tables are non-persistent buffers). Registration order says nothing about when such
a module runs (Llama registers ``rotary_emb`` after ``norm`` and calls it before the first layer; a
single dropout may be called in several places), and running one costs no memory, so every stage
runs them itself: they never start a stage and never make a split depend on call order. They keep
a stage in ``stage_of`` for the table only.

A parameter used by units of several stages (tied embeddings) is listed in ``tied`` with its name
on each of those stages; tied.py keeps the stages' copies equal (flush schedules) or bounded-stale (PACI).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

try:  # torchmetrics modules are per-process bookkeeping, not pipeline units
    from torchmetrics import Metric as _Metric
except ImportError:  # pragma: no cover - torchmetrics is a dependency
    _Metric = ()

PARTITIONS = ("parameters", "uniform")


@dataclass(frozen=True)
class Partition:
    """Units in execution order and the stage each belongs to; ``trunk`` is the block container."""

    units: tuple[str, ...]
    stage_of: tuple[int, ...]
    params: tuple[int, ...]
    trunk: str
    shared: tuple[str, ...] = ()  # units every stage runs itself (no parameters, no persistent buffers)
    # One parameter used by units of several stages: ((name on stage a, a), (name on stage b, b), ...);
    # each of those stages holds a copy and tied.py keeps the copies equal.
    tied: tuple[tuple[tuple[str, int], ...], ...] = ()

    @property
    def n_stages(self) -> int:
        return self.stage_of[-1] + 1

    def stage_units(self, stage: int) -> list[str]:
        return [u for u, s in zip(self.units, self.stage_of) if s == stage]

    def first_unit(self, stage: int) -> str:
        """The unit whose input is what stage ``stage - 1`` sends (never a shared unit)."""
        return next(u for u in self.stage_units(stage) if u not in self.shared)

    def stage_params(self, stage: int) -> int:
        return sum(p for p, s in zip(self.params, self.stage_of) if s == stage)

    def table(self) -> str:
        total = max(sum(self.params), 1)
        rows = [f"{'stage':>5} | {'units':<48} | {'parameters':>12} | share"]
        for i in range(self.n_stages):
            units = self.stage_units(i)
            span = units[0] if len(units) == 1 else f"{units[0]} .. {units[-1]} ({len(units)})"
            n = self.stage_params(i)
            rows.append(f"{i:>5} | {span:<48} | {n:>12,} | {n / total:5.1%}")
        return "\n".join(rows)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def is_shared_unit(module: nn.Module) -> bool:
    """No parameters and no persistent buffers: every stage can run it, holding nothing of its own."""
    if any(True for _ in module.parameters()):
        return False
    for sub in module.modules():
        if any(b is not None and k not in sub._non_persistent_buffers_set for k, b in sub._buffers.items()):
            return False
    return True


def _is_block_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2


def find_trunk(model: nn.Module) -> str:
    """Name of the block container with the most parameters (shallowest on ties); raises if none."""
    candidates = [(name, m) for name, m in model.named_modules()
                  if _is_block_container(m) and not isinstance(m, _Metric)]
    if not candidates:
        raise ValueError(
            f"cannot split {type(model).__name__} into stages: it has no nn.ModuleList or nn.Sequential "
            "of blocks. Pipeline stages need a forward that runs an embedding, a ModuleList/Sequential of "
            "blocks, a final norm and a head (nanoGPT style), or a plain nn.Sequential; otherwise pass "
            "split_points=[...] with the names of the modules where stages 2..N begin.")
    best = max(candidates, key=lambda c: (_params(c[1]), -c[0].count(".")))
    return best[0]


def _ancestors(name: str) -> set[str]:
    """"a.b.c" -> {"", "a", "a.b"}: the modules expanded so that ``name`` is a unit."""
    parts = name.split(".") if name else []
    return {".".join(parts[:k]) for k in range(len(parts))}


def list_units(model: nn.Module, trunk: str, split_points: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Units in registration order: ancestors of the trunk expanded into children, trunk into blocks.
    With ``split_points`` the ancestors of every split point are expanded instead (the trunk's too,
    if the model has one, so automatic names stay valid)."""
    expanded = _ancestors(trunk) | ({trunk} if trunk else set())
    if split_points is not None:
        expanded = set().union(*(_ancestors(p) for p in split_points)) | (expanded if trunk else {""})
    units: list[tuple[str, nn.Module]] = []

    def expand(module: nn.Module, prefix: str) -> None:
        own = [n for n, p in module.named_parameters(recurse=False)]
        if own:
            raise ValueError(
                f"cannot split: parameters {[prefix + n for n in own]} sit directly on "
                f"{prefix.rstrip('.') or 'the root module'}, which the pipeline splits into stages; move them "
                "into a submodule (e.g. an nn.Embedding or a small nn.Module) so they belong to one stage")
        for name, child in module.named_children():
            full = prefix + name
            if isinstance(child, _Metric):
                continue
            if full in expanded:
                expand(child, full + ".")
            else:
                units.append((full, child))

    expand(model, "")
    return units


def _candidate_cuts(names: list[str], trunk: str) -> list[int]:
    """Unit indices where an automatic partition may start a stage."""
    prefix = trunk + "." if trunk else ""
    blocks = [k for k, n in enumerate(names) if n.startswith(prefix) and "." not in n[len(prefix):]]
    cuts = blocks[1:]
    if blocks[-1] + 1 < len(names):
        cuts.append(blocks[-1] + 1)
    return cuts


def _balanced_cuts(weights: list[int], cuts: list[int], n_stages: int) -> list[int]:
    """Choose n_stages-1 cut indices minimising the heaviest stage (exact dynamic programme)."""
    bounds = [0] + cuts + [len(weights)]
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def cost(a: int, b: int) -> int:
        return prefix[bounds[b]] - prefix[bounds[a]]

    last = len(bounds) - 1
    # best[s][b]: minimal max-weight covering units up to bounds[b] with s stages; choice for backtrack.
    inf = float("inf")
    best = [[inf] * (last + 1) for _ in range(n_stages + 1)]
    choice = [[0] * (last + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for b in range(1, last + 1):
            for a in range(s - 1, b):
                value = max(best[s - 1][a], cost(a, b))
                if value < best[s][b]:
                    best[s][b], choice[s][b] = value, a
    out, b = [], last
    for s in range(n_stages, 0, -1):
        a = choice[s][b]
        out.append(a)
        b = a
    return [bounds[a] for a in sorted(out)[1:]]


def partition_model(model: nn.Module, n_stages: int, split_points: list[str] | None = None,
                    partition: str = "parameters") -> Partition:
    """Assign every unit of ``model`` to one of ``n_stages`` stages; raises ValueError with a fix."""
    if partition not in PARTITIONS:
        raise ValueError(f"partition={partition!r} is not supported: choose one of {PARTITIONS}")
    if split_points is None:
        trunk = find_trunk(model)
    else:
        try:
            trunk = find_trunk(model)
        except ValueError:  # split_points need no trunk: any module tree splits at the named modules
            trunk = ""
        modules = dict(model.named_modules())
        unknown = [p for p in split_points if p not in modules or not p]
        if unknown:
            valid = [n for n, _ in list_units(model, trunk)]
            raise ValueError(f"split_points {unknown} are not modules of the model; valid names, in "
                             f"registration order: {', '.join(valid)} (or any submodule of them)")
    units = list_units(model, trunk, split_points)
    names = [n for n, _ in units]
    params = [_params(m) for _, m in units]
    shared = tuple(n for n, m in units if is_shared_unit(m))
    if split_points is not None:
        unshared = [p for p in split_points if p in shared]
        if unshared:
            raise ValueError(f"split_points {unshared} have no parameters: every stage runs such modules "
                             "itself, so a stage cannot begin there; name the next module with parameters")
        missing = [p for p in split_points if p not in names]
        if missing:
            raise ValueError(f"split_points {missing} contain other split points or the trunk; name modules "
                             f"that are not ancestors of one another; units here: {', '.join(names)}")
        starts = [names.index(p) for p in split_points]
        if len(starts) != n_stages - 1 or starts != sorted(set(starts)) or 0 in starts:
            raise ValueError(f"split_points must name {n_stages - 1} distinct units in execution order "
                             f"(the first units of stages 1..{n_stages - 1}), got {split_points}")
    else:
        cuts = [k for k in _candidate_cuts(names, trunk) if names[k] not in shared]
        n_blocks = sum(1 for n in names if n.startswith(trunk + ".") or not trunk)
        if n_stages - 1 > len(cuts):
            raise ValueError(f"cannot split into {n_stages} stages: the model has {n_blocks} blocks in "
                             f"'{trunk or type(model).__name__}' (at most {len(cuts) + 1} stages); use "
                             "fewer stages/devices or pass split_points")
        if partition == "uniform":
            prefix = trunk + "."
            weights = [1 if n.startswith(prefix) or not trunk else 0 for n in names]
        else:
            weights = params
        starts = _balanced_cuts(weights, cuts, n_stages)
    stage_of, stage = [], 0
    for k in range(len(names)):
        if stage < len(starts) and k == starts[stage]:
            stage += 1
        stage_of.append(stage)
    found = Partition(tuple(names), tuple(stage_of), tuple(params), trunk, shared)
    for i in range(n_stages):
        if all(u in shared for u in found.stage_units(i)):
            raise ValueError(f"stage {i} would hold only parameter-free modules {found.stage_units(i)}, which "
                             "every stage runs itself; choose split_points so that each stage holds parameters")
    return replace(found, tied=find_tied(model, found))


def find_tied(model: nn.Module, partition: Partition) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Parameters shared by units of different stages, each with its name on every stage using it."""
    uses: dict[int, dict[int, str]] = {}
    order: list[int] = []
    modules = dict(model.named_modules())
    for unit, stage in zip(partition.units, partition.stage_of):
        for pname, p in modules[unit].named_parameters(remove_duplicate=False):
            if id(p) not in uses:
                order.append(id(p))
            uses.setdefault(id(p), {}).setdefault(stage, f"{unit}.{pname}")
    return tuple(tuple((name, s) for s, name in sorted(uses[k].items())) for k in order if len(uses[k]) > 1)
