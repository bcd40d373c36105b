"""The messages plans imply, checked under gloo's and NCCL's matching rules (pure Python, no torch).

The programs below can be checked by eye: a stage receives a forward's activations before it runs
(``rA wA F``), sends them on and posts the gradient's receive right after (``F sA rG``), waits for the
gradient before the backward (``wG B``) and sends its input gradient back after it (``B sG``); the next
activation receive of the same batch is posted as soon as the current one has arrived.
"""

from __future__ import annotations

import pytest

from lightning_paci.comm import (
    EAGER,
    LAZY,
    PER_DIRECTION,
    SHARED,
    CommOp,
    check_transport,
    lower,
    lower_plan,
)
from lightning_paci.plan import format_actions, parse_actions, parse_program, validate
from lightning_paci.schedules import SCHEDULES, PlanSpec

PROGRAMS = {
    ("1f1b", 2, 2, 2, 1): [
        "F0 sA0 rG0 F1 sA1 rG1 wG0 B0 wG1 B1 S W",
        "rA0 wA0 rA1 F0 B0 sG0 wA1 F1 B1 sG1 S W",
    ],
    # PACI over two batches: stage 1 posts rA1 inside batch 0 but never rA2 across the batch boundary.
    ("paci", 3, 2, 2, 2): [
        "F0 sA0 rG0 F1 sA1 rG1 F2 sA2 rG2 wG0 B0 F3 sA3 rG3 wG1 B1 S wG2 B2 wG3 B3 S W",
        "rA0 wA0 rA1 F0 sA0 rG0 wA1 F1 sA1 rG1 wG0 B0 sG0 rA2 wA2 rA3 F2 sA2 rG2 wG1 B1 sG1 S "
        "wA3 F3 sA3 rG3 wG2 B2 sG2 wG3 B3 sG3 S W",
        "rA0 wA0 rA1 F0 B0 sG0 wA1 F1 B1 sG1 S rA2 wA2 rA3 F2 B2 sG2 wA3 F3 B3 sG3 S W",
    ],
}
CONFIGS = [(s, n, m, a) for s in SCHEDULES for n in range(2, 9) for m in range(1, 9) for a in sorted({1, m})]


@pytest.mark.parametrize("key", list(PROGRAMS), ids=lambda k: "-".join(map(str, k)))
def test_lowered_programs_literal(key) -> None:
    schedule, n, m, a, k = key
    programs = lower_plan(PlanSpec(schedule, n, m, a).plan(k))
    assert [format_actions(p) for p in programs] == PROGRAMS[key]
    assert [parse_program(text) for text in PROGRAMS[key]] == list(programs)  # the text form round-trips


@pytest.mark.parametrize("schedule,n,m,a", CONFIGS)
def test_every_plan_is_deadlock_free_on_both_transports_with_a_group_per_direction(schedule, n, m, a) -> None:
    programs = lower_plan(PlanSpec(schedule, n, m, a).plan(3), EAGER)
    for transport in ("gloo", "nccl"):
        check_transport(programs, transport, PER_DIRECTION)


def test_one_shared_group_deadlocks_on_nccl_wherever_two_micro_batches_meet() -> None:
    """The order of posts fedc153 used, on its one shared group: gloo accepts every plan, NCCL only those
    where no stage ever has a gradient receive queued ahead of the next activation send (m=1 flush plans,
    and PACI on two stages with m=1), i.e. fedc153 would hang at the first backward on GPUs."""
    passed = []
    for schedule, n, m, a in CONFIGS:
        programs = lower_plan(PlanSpec(schedule, n, m, a).plan(3), EAGER)
        check_transport(programs, "gloo", SHARED)
        try:
            check_transport(programs, "nccl", SHARED)
            passed.append((schedule, n, m))
        except ValueError as error:
            assert "deadlock under nccl's rules" in str(error)
    expected = [("paci", 2, 1)] + [(s, n, 1) for s in ("1f1b", "gpipe") for n in range(2, 9)]
    assert sorted(passed) == sorted(expected)


def test_nccl_deadlock_is_reported_with_both_stages_and_the_stream() -> None:
    programs = lower_plan(PlanSpec("1f1b", 2, 2, 2).plan(1))
    with pytest.raises(ValueError) as error:
        check_transport(programs, "nccl", SHARED)
    text = str(error.value)
    assert "stage 0 waits at wG0 (slot 6)" in text and "stage 1 waits at wA1 (slot 6)" in text
    assert "queued stage 0: rG0 sA1 rG1, stage 1: rA1 sG0" in text  # rG0 heads stage 0's queue, sG0 is behind rA1


def test_lazy_posting_alone_does_not_make_a_shared_group_safe() -> None:
    """Posting each receive just before its wait still deadlocks 1F1B on a shared NCCL stream: both
    stages' next operations are sends (sA1 on stage 0, sG0 on stage 1), and NCCL pairs sends with receives."""
    programs = lower_plan(PlanSpec("1f1b", 2, 2, 2).plan(1), LAZY)
    check_transport(programs, "gloo", SHARED)
    with pytest.raises(ValueError, match="deadlock under nccl's rules"):
        check_transport(programs, "nccl", SHARED)
    check_transport(programs, "nccl", PER_DIRECTION)


def test_a_receive_left_posted_across_a_drain_is_refused() -> None:
    # F1 without F2: lowering on a plan cut mid-batch would leave rA2 posted.
    with pytest.raises(ValueError, match=r"receives \[2\] left posted"):
        lower(parse_actions("F1"), 1, 2, 4)


def test_validate_checks_messages_under_nccl() -> None:
    validate(PlanSpec("paci", 4, 4, 4).plan(3))  # uses the runtime's layout: a group per direction


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_runtime_lowering_batch_by_batch_is_the_proven_program(schedule) -> None:
    """The runtime lowers each batch without ``W`` and each drain with it (runtime.train_batch/drain), with
    Lightning's windows (``closes``); the concatenation must be the program validate() proved, for every
    N in 2..8, m in 1..8 and windows of one or two batches (the steps do not change the messages)."""
    for n in range(2, 9):
        for m in range(1, 9):
            spec = PlanSpec(schedule, n, m, m)
            proven = lower_plan(spec.plan(4))
            for closes in ({0, 1, 2, 3}, {1, 3}):
                for i in range(n):
                    batches = [spec.batch(i, k, closes) for k in range(4)]
                    run = [op for actions in batches for op in lower(actions, i, n, m, wait_sends=False)]
                    run += lower(spec.drain(i, 4, closes), i, n, m)
                    ops = [op for op in run if isinstance(op, CommOp)]
                    assert ops == [op for op in proven[i] if isinstance(op, CommOp)], (schedule, n, m, i)


def test_evaluation_program_sends_forward_only() -> None:
    """An evaluation batch (runtime._forward_only): no gradient receive is posted, nothing left posted."""
    program = lower(parse_actions("F0 F1 F2"), 1, 3, 3, gradients=False, wait_sends=False)
    assert format_actions(program) == "rA0 wA0 rA1 F0 sA0 wA1 rA2 F1 sA1 wA2 F2 sA2"
    check_transport([lower(parse_actions("F0 F1 F2"), i, 3, 3, gradients=False) for i in range(3)], "nccl",
                    PER_DIRECTION)
