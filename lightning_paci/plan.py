"""Actions and plans: the one description of a pipeline schedule that every consumer reads.

A plan gives, for each stage, the ordered list of actions that stage runs. The multi-process
runtime executes it, the simulator times it, the tests check it and the grid printer shows it.
Nothing here imports torch.

Actions print compactly and parse back: ``F3`` forward of micro-batch 3, ``B3`` its backward,
``S`` an optimizer step of the stage (it follows the backward that completes a window), ``R`` the
all-reduce of the window's gradients over the stage's data-parallel replicas (``replicas > 1``): it
comes right before the window's last backward, whose gradients it averages as they are produced,
and ``S`` waits for it::

    >>> parse_actions("F0 F1 B0 S")
    (F0, F1, B0, S)
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from lightning_paci.comm import EAGER, PER_DIRECTION, CommOp, check_transport, lower_plan, parse_op

FORWARD, BACKWARD, STEP, ALLREDUCE = "F", "B", "S", "R"
_ACTION_RE = re.compile(r"^(?:([FB])(\d+)|([SR]))$")


class Action(NamedTuple):
    """One unit of stage work: ``kind`` is F, B, S or R; ``micro_batch`` is None for S and R."""

    kind: str
    micro_batch: int | None = None

    def __str__(self) -> str:
        return self.kind if self.micro_batch is None else f"{self.kind}{self.micro_batch}"

    __repr__ = __str__


def F(j: int) -> Action:
    return Action(FORWARD, j)


def B(j: int) -> Action:
    return Action(BACKWARD, j)


S = Action(STEP)
R = Action(ALLREDUCE)


def parse_actions(text: str) -> tuple[Action, ...]:
    """Parse the text form (``"F0 B0 S"``) back into actions."""
    actions = []
    for token in text.split():
        match = _ACTION_RE.match(token)
        if match is None:
            raise ValueError(f"cannot parse action {token!r}: expected F<n>, B<n>, S or R")
        kind, j, single = match.groups()
        actions.append(Action(single) if kind is None else Action(kind, int(j)))
    return tuple(actions)


def parse_program(text: str) -> tuple[Action | CommOp, ...]:
    """Parse a lowered program's text form (``"rA0 wA0 F0 sA0"``, see comm.py) back into one."""
    out: list[Action | CommOp] = []
    for token in text.split():
        op = parse_op(token)
        out += parse_actions(token) if op is None else [op]
    return tuple(out)


def format_actions(actions: tuple[Action, ...] | list[Action]) -> str:
    return " ".join(map(str, actions))


@dataclass(frozen=True)
class Plan:
    """Per-stage action lists for ``n_batches`` global batches, ending drained.

    ``stages[i]`` is what stage ``i`` (0 = first) runs; micro-batch ``j`` belongs to global batch
    ``j // micro_batches``. ``accumulation`` is the number of backwards each optimizer step averages;
    ``replicas`` the number of data-parallel copies of the pipeline (each S then follows an R).
    """

    schedule: str
    n_stages: int
    micro_batches: int
    accumulation: int
    n_batches: int
    stages: tuple[tuple[Action, ...], ...]
    replicas: int = 1

    def grid(self, mark: tuple[int, int] | None = None) -> str:
        """The plan as a stage x slot table; ``mark=(stage, index)`` brackets one cell."""
        width = max((len(str(a)) for acts in self.stages for a in acts), default=1) + 2
        lines = [f"{self.schedule}: {self.n_stages} stages, {self.micro_batches} micro-batches, "
                 f"accumulation {self.accumulation}, {self.n_batches} batches"
                 + (f", {self.replicas} replicas" if self.replicas > 1 else "")]
        for i, actions in enumerate(self.stages):
            cells = []
            for k, action in enumerate(actions):
                text = f"[{action}]" if mark == (i, k) else str(action)
                cells.append(text.rjust(width))
            lines.append(f"stage {i}:" + "".join(cells))
        return "\n".join(lines)


def version_drift(actions: tuple[Action, ...] | list[Action]) -> dict[int, int]:
    """Drift of each micro-batch on one stage: optimizer steps between its forward and backward."""
    version, at_forward, drift = 0, {}, {}
    for action in actions:
        if action.kind == STEP:
            version += 1
        elif action.kind == FORWARD:
            at_forward[action.micro_batch] = version
        elif action.kind == BACKWARD:
            drift[action.micro_batch] = version - at_forward[action.micro_batch]
    return drift


def drift_histogram(actions: tuple[Action, ...] | list[Action]) -> dict[int, int]:
    return dict(sorted(Counter(version_drift(actions).values()).items()))


def max_drift(actions: tuple[Action, ...] | list[Action]) -> int:
    return max(version_drift(actions).values(), default=0)


def peak_in_flight(actions: tuple[Action, ...] | list[Action]) -> int:
    """Most micro-batches forwarded but not yet backwarded at any point on one stage."""
    live = peak = 0
    for action in actions:
        live += {FORWARD: 1, BACKWARD: -1}.get(action.kind, 0)
        peak = max(peak, live)
    return peak


def drift_bound(stage: int, n_stages: int, accumulation: int) -> int:
    """PACI's bound: between F(j) and B(j) stage i runs N-1-i other backwards, so ceil((N-1-i)/a)."""
    return math.ceil((n_stages - 1 - stage) / accumulation)


def validate(plan: Plan) -> None:
    """Raise ValueError unless the plan is complete, ordered, stepped correctly and deadlock-free.

    Deadlock freedom is checked on the messages the plan implies, posted as the runtime posts them
    (comm.lower), under both gloo's and NCCL's matching rules with the runtime's process groups (one
    per direction and boundary): F(j) on stage i waits for F(j)'s activations from stage i-1, B(j) on
    stage i for B(j)'s gradient from stage i+1, and nothing else blocks on NCCL either.
    """
    n_micro = plan.n_batches * plan.micro_batches
    for i, actions in enumerate(plan.stages):
        forwards = [a.micro_batch for a in actions if a.kind == FORWARD]
        backwards = [a.micro_batch for a in actions if a.kind == BACKWARD]
        if forwards != list(range(n_micro)) or backwards != list(range(n_micro)):
            raise ValueError(f"stage {i}: forwards and backwards must each cover micro-batches "
                             f"0..{n_micro - 1} in order, got {format_actions(actions)}")
        seen, since_step, reducing = set(), 0, False
        for k, action in enumerate(actions):
            nxt = actions[k + 1] if k + 1 < len(actions) else None
            if action.kind == ALLREDUCE:
                _check_allreduce(plan, i, k, actions)
                reducing = True
            elif action.kind == FORWARD:
                seen.add(action.micro_batch)
            elif action.kind == BACKWARD:
                if action.micro_batch not in seen:
                    raise ValueError(f"stage {i}: {action} at slot {k} precedes its forward")
                since_step += 1
                if since_step == plan.accumulation and nxt != S:
                    raise ValueError(f"stage {i}: no step after {action}, the backward that completes "
                                     f"a window of {plan.accumulation} (slot {k})")
            else:
                partial_drain_step = 0 < since_step < plan.accumulation and nxt is None
                if since_step != plan.accumulation and not partial_drain_step:
                    raise ValueError(f"stage {i}: step at slot {k} after {since_step} backwards; steps "
                                     f"come after every {plan.accumulation}th, or last to drain a window")
                if plan.replicas > 1 and not reducing:
                    raise ValueError(f"stage {i}: step at slot {k} without an R before the window's last "
                                     f"backward: {plan.replicas} replicas would step on different gradients")
                since_step, reducing = 0, False
        if since_step:
            raise ValueError(f"stage {i}: plan ends with {since_step} backwards not stepped (not drained)")
        if reducing:
            raise ValueError(f"stage {i}: an R is not followed by its window's step")
    programs = lower_plan(plan, EAGER)
    for transport in ("gloo", "nccl"):
        check_transport(programs, transport, PER_DIRECTION)


def _check_allreduce(plan: Plan, stage: int, k: int, actions: tuple[Action, ...]) -> None:
    """R belongs right before the backward that ends a window (then S), and only with replicas: the
    all-reduce averages that backward's gradients as they come, overlapping it."""
    if plan.replicas == 1:
        raise ValueError(f"stage {stage}: R at slot {k} in a plan of one replica (nothing to all-reduce)")
    window_end = actions[k + 1:k + 3]
    if len(window_end) < 2 or window_end[0].kind != BACKWARD or window_end[1].kind != STEP:
        raise ValueError(f"stage {stage}: R at slot {k} must come right before the backward that ends a "
                         f"window (then S), found {format_actions(window_end) or 'the end of the plan'}")
