"""Tied weights under PACI, planned: how stale a holder's copy is, and the messages that keep it so.

The owner (the first stage holding the tied parameter) steps it; every other holder sends its share
of window w's gradient up at its S_w and installs the owner's weight W_w (after the owner's step w)
at its S_{w+lag}. ``tied_lag`` reads ``lag`` off the plan: the smallest number of the holder's steps
after which the owner's S_w has already happened in every run of the plan (it happens-before the
holder's S_{w+lag} through the pipeline's own messages), so the holder's wait for W_w finds it sent
and nothing stalls. ``lower_tied`` adds the messages to a stage's lowered program (comm.lower) and
``check_tied`` proves the result deadlock-free under gloo's and NCCL's rules. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_paci.comm import (
    PER_DIRECTION,
    POST_RECV,
    SEND,
    TIED_GRAD,
    TIED_WEIGHT,
    WAIT,
    WAIT_SENDS,
    CommOp,
    check_transport,
    lower_plan,
)
from lightning_paci.dataflow import advance
from lightning_paci.plan import BACKWARD, FORWARD, STEP, Plan


def _clocks(plan: Plan, owner: int, holders: Sequence[int]) -> list[list[tuple[int, ...]]]:
    """Vector clocks of every action: entry s of stage i's clock at slot k is the last slot of stage s
    that happens-before it. F(j) follows F(j) upstream, B(j) follows B(j) downstream, and the owner's
    S_w follows every holder's S_w (it adds their shares)."""
    n = plan.n_stages
    slot = [{a: k for k, a in enumerate(acts) if a.kind != STEP} for acts in plan.stages]
    steps = [[k for k, a in enumerate(acts) if a.kind == STEP] for acts in plan.stages]
    clocks: list[list[Any]] = [[None] * len(acts) for acts in plan.stages]
    window = [0] * n

    def run(i: int, k: int, action: Any) -> bool:
        if action.kind == FORWARD and i > 0:
            deps = [(i - 1, slot[i - 1][action])]
        elif action.kind == BACKWARD and i < n - 1:
            deps = [(i + 1, slot[i + 1][action])]
        elif action.kind == STEP and i == owner:
            deps = [(h, steps[h][window[i]]) for h in holders]
        else:
            deps = []
        if any(clocks[s][x] is None for s, x in deps):
            return False
        before = [clocks[i][k - 1] if k else (-1,) * n] + [clocks[s][x] for s, x in deps]
        clock = [max(c[s] for c in before) for s in range(n)]
        clock[i] = k
        clocks[i][k] = tuple(clock)
        window[i] += action.kind == STEP
        return True

    cursor = advance(plan.stages, run)
    stuck = [i for i in range(n) if cursor[i] < len(plan.stages[i])]
    if stuck:
        raise ValueError(f"tied weights: stages {stuck} wait on each other (owner stage {owner} steps after "
                         f"holders {list(holders)})\n{plan.grid()}")
    return clocks


def tied_lag(plan: Plan, owner: int, holder: int) -> int:
    """Holder steps between the owner's step w and the holder's install of its weight W_w (see above)."""
    clocks = _clocks(plan, owner, [holder])
    owner_steps = [k for k, a in enumerate(plan.stages[owner]) if a.kind == STEP]
    holder_steps = [k for k, a in enumerate(plan.stages[holder]) if a.kind == STEP]
    lags = []
    for w, at in enumerate(owner_steps):
        after = [v for v, k in enumerate(holder_steps) if clocks[holder][k][owner] >= at]
        if after:
            lags.append(after[0] - w)
    if not lags:
        raise ValueError(f"tied weights: no step of stage {holder} follows any step of stage {owner} in "
                         f"the plan, so stage {holder}'s copy could be refreshed only at drains:\n{plan.grid()}"
                         "\nuse more micro-batches per batch (micro_batches >= stages) or untie the weights")
    return max(lags)


def spec_lag(spec: Any, owner: int, holders: Sequence[int]) -> int:
    """``tied_lag`` for a PlanSpec, read off a plan long enough to reach its steady state, and proved
    deadlock-free with its tied messages (``check_tied``)."""
    windows_per_batch = spec.micro_batches / spec.accumulation
    n_batches = math.ceil((spec.n_stages + 3) / min(windows_per_batch, 1.0))
    plan = spec.plan(n_batches)
    lag = max(tied_lag(plan, owner, h) for h in holders)
    check_tied(plan, owner, holders, lag)
    return lag


def lower_tied(program: Sequence[Any], stage: int, owner: int, holders: Sequence[int], lag: int,
               first: int, since: int, drain: bool) -> tuple[Any, ...]:
    """``program`` (comm.lower of one batch or drain) with the tied messages around each S.

    ``first``: this stage's steps before the program (its window numbering), ``since``: its steps at
    the last drain (no weight was asked for before). The owner, at S_w: ``rT w>h wT w>h`` per holder
    (add the shares), ``WU`` (its previous weight send has left: the step overwrites that weight), S,
    ``sU w>h``. A holder, at S_w: ``sT w>owner`` (then drops its share: its optimizer skips the copy), S,
    ``wU w-lag>owner`` (install), ``rU w>owner``. A drain's holder waits for every weight still owed
    before its final ``W``. Both ends post in window order, so NCCL's one stream per pair matches them.
    """
    if stage != owner and stage not in holders:
        return tuple(program)
    out: list[Any] = []
    w = first
    for op in program:
        if isinstance(op, CommOp) and op.verb == WAIT_SENDS and op.kind is None and drain and stage != owner:
            out += [CommOp(WAIT, TIED_WEIGHT, v, owner) for v in range(max(since, w - lag), w)]
        if isinstance(op, CommOp) or op.kind != STEP:
            out.append(op)
            continue
        if stage == owner:
            out += [CommOp(POST_RECV, TIED_GRAD, w, h) for h in holders]
            out += [CommOp(WAIT, TIED_GRAD, w, h) for h in holders]
            out += [CommOp(WAIT_SENDS, TIED_WEIGHT), op]
            out += [CommOp(SEND, TIED_WEIGHT, w, h) for h in holders]
        else:
            out += [CommOp(SEND, TIED_GRAD, w, owner), op]
            if w - lag >= since:
                out.append(CommOp(WAIT, TIED_WEIGHT, w - lag, owner))
            out.append(CommOp(POST_RECV, TIED_WEIGHT, w, owner))
        w += 1
    return tuple(out)


def check_tied(plan: Plan, owner: int, holders: Sequence[int], lag: int) -> None:
    """Raise ValueError unless the plan's programs with their tied messages run to the end under gloo's
    and NCCL's rules (the tied group is a process group of its own: streams of its own)."""
    programs = [lower_tied(p, i, owner, holders, lag, 0, 0, drain=True) for i, p in enumerate(lower_plan(plan))]
    for transport in ("gloo", "nccl"):
        check_transport(programs, transport, PER_DIRECTION)
