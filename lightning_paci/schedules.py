"""GPipe, 1F1B-flush and PACI as pure functions from sizes to plans (no torch import).

Each schedule says which forwards and backwards a stage runs while global batch ``k`` (counted
from the last drain) is being trained, and which it still owes at a drain. Optimizer steps are
inserted by one shared rule, not by the schedules: every stage runs its backwards in micro-batch
order, so ``S`` follows ``B(j)`` exactly when ``(j + 1) % accumulation == 0``, and a drain ends with
one more ``S`` if a window is left partly accumulated. See ../shared/PACI.md for the canonical order.

Under Lightning the windows are Lightning's (``closes``): the batches after which its loop steps
(every ``accumulate_grad_batches``-th batch of an epoch and the epoch's last batch). ``S`` then
follows the backward of the last micro-batch of each such batch, and a drain in the middle of a
window (a validation) runs the owed backwards without a step: the window goes on accumulating after
it, as under DDP, and every stage's step count stays equal to Lightning's ``global_step``.

Micro-batch ``j`` of a segment belongs to batch ``j // m``; numbering restarts after each drain,
where the pipeline is empty.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from lightning_paci.plan import Action, B, F, Plan, R, S, validate

SCHEDULES = ("paci", "1f1b", "gpipe")
# The Lightning strategy names (StrategyRegistry) for each schedule.
STRATEGY_NAMES = {"paci": "paci", "1f1b": "pipe_1f1b", "gpipe": "pipe_gpipe"}


def check_schedule(name: str) -> str:
    """The schedule ``name`` stands for; Lightning's strategy names (``"pipe_1f1b"``) are accepted too."""
    name = {strategy: schedule for schedule, strategy in STRATEGY_NAMES.items()}.get(name, name)
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)} (or the strategy "
                         f"names {', '.join(STRATEGY_NAMES.values())})")
    return name


def warmup(schedule: str, stage: int, n_stages: int, micro_batches: int) -> int:
    """Forwards a stage runs ahead of its first backward (w_i in PACI.md)."""
    if schedule == "gpipe":
        return micro_batches
    if schedule == "1f1b":
        return min(n_stages - 1 - stage, micro_batches)
    return n_stages - 1 - stage


def _forwards_backwards(schedule: str, stage: int, n_stages: int, m: int, k: int) -> list[Action]:
    """F/B order of stage ``stage`` while batch ``k`` trains (no steps yet)."""
    first = k * m
    w = warmup(schedule, stage, n_stages, m)
    if schedule == "paci":  # F(j), then the backward w forwards behind it, never flushing
        out = []
        for j in range(first, first + m):
            out.append(F(j))
            if j - w >= 0:
                out.append(B(j - w))
        return out
    # Flush schedules finish batch k inside its own window.
    out = [F(j) for j in range(first, first + w)]
    for j in range(first, first + m - w):
        out += [F(j + w), B(j)]
    return out + [B(j) for j in range(first + m - w, first + m)]


def _owed_at_drain(schedule: str, stage: int, n_stages: int, m: int, n_batches: int) -> list[Action]:
    """Backwards still owed after ``n_batches`` batches: PACI's last w_i; none for flush schedules."""
    if schedule != "paci":
        return []
    total = n_batches * m
    return [B(j) for j in range(max(0, total - warmup(schedule, stage, n_stages, m)), total)]


def _with_steps(actions: list[Action], accumulation: int, m: int, closes: Collection[int] | None) -> list[Action]:
    """``S`` after each backward that completes a window: every ``accumulation``-th, or with
    ``closes`` the last micro-batch of each batch in ``closes``."""
    out = []
    for action in actions:
        out.append(action)
        if action.kind != "B":
            continue
        j = action.micro_batch
        if closes is None:
            ends_window = (j + 1) % accumulation == 0
        else:
            ends_window = (j + 1) % m == 0 and j // m in closes
        if ends_window:
            out.append(S)
    return out


def _with_allreduce(actions: list[Action]) -> list[Action]:
    """``R`` right before each backward that an ``S`` follows: with data-parallel replicas, the window's
    gradients are averaged over them while that last backward produces them, and S waits for it."""
    out = []
    for k, action in enumerate(actions):
        if action.kind == "B" and k + 1 < len(actions) and actions[k + 1] == S:
            out.append(R)
        out.append(action)
    return out


@dataclass(frozen=True)
class PlanSpec:
    """A schedule with its sizes; the runtime asks it for one batch (or one drain) at a time."""

    schedule: str
    n_stages: int
    micro_batches: int
    accumulation: int
    replicas: int = 1  # data-parallel copies of the pipeline: each window's step follows an R

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", check_schedule(self.schedule))  # "pipe_1f1b" -> "1f1b"
        for name in ("n_stages", "micro_batches", "accumulation", "replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def batch(self, stage: int, k: int, closes: Collection[int] | None = None) -> tuple[Action, ...]:
        """Actions stage ``stage`` runs while batch ``k`` (since the last drain) trains; ``closes``:
        the batches (since the last drain) that end a window, if not every accumulation-th backward."""
        fb = _forwards_backwards(self.schedule, stage, self.n_stages, self.micro_batches, k)
        return self._reduced(_with_steps(fb, self.accumulation, self.micro_batches, closes))

    def _reduced(self, actions: list[Action]) -> tuple[Action, ...]:
        return tuple(_with_allreduce(actions) if self.replicas > 1 else actions)

    def drain(self, stage: int, n_batches: int, closes: Collection[int] | None = None) -> tuple[Action, ...]:
        """Actions that empty the pipeline after ``n_batches`` batches. Without ``closes`` they close
        the last window; with it, a window still open stays open (its gradients stay accumulated)."""
        m = self.micro_batches
        owed = _with_steps(_owed_at_drain(self.schedule, stage, self.n_stages, m, n_batches),
                           self.accumulation, m, closes)
        if closes is None and (n_batches * m) % self.accumulation:
            owed.append(S)
        return self._reduced(owed)

    def plan(self, n_batches: int, closes: Collection[int] | None = None) -> Plan:
        """The whole segment: batches 0..n_batches-1 then the drain, for every stage. ``validate``
        accepts only plans with the fixed windows (``closes=None``)."""
        single = replace(self, replicas=1)  # R goes in once the whole list is known: a drain's S may
        stages = []  # close a window whose last backward ran in the last batch
        for i in range(self.n_stages):
            actions: list[Action] = []
            for k in range(n_batches):
                actions += single.batch(i, k, closes)
            stages.append(self._reduced(actions + list(single.drain(i, n_batches, closes))))
        return Plan(self.schedule, self.n_stages, self.micro_batches, self.accumulation, n_batches,
                    tuple(stages), self.replicas)


def build_plan(schedule: str, n_stages: int, micro_batches: int, accumulation: int | None = None,
               n_batches: int = 1, replicas: int = 1) -> Plan:
    """Validated plan; ``accumulation`` defaults to ``micro_batches`` (one step per global batch)."""
    spec = PlanSpec(schedule, n_stages, micro_batches, accumulation or micro_batches, replicas)
    plan = spec.plan(n_batches)
    validate(plan)
    return plan
