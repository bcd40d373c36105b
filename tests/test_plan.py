"""Plans as literal tables, plus the properties every schedule promises (pure Python, no torch).

The tables below can be checked by eye against ../shared/PACI.md: stage i warms up with N-1-i
forwards, then alternates F(j + w_i), B(j); ``S`` follows every a-th backward; flush schedules
restart their warm-up every m micro-batches, GPipe runs all m forwards then all m backwards.
"""

from __future__ import annotations

import math

import pytest

from lightning_paci.plan import (
    Plan,
    drift_bound,
    drift_histogram,
    format_actions,
    max_drift,
    parse_actions,
    peak_in_flight,
    validate,
    version_drift,
)
from lightning_paci.schedules import SCHEDULES, PlanSpec, build_plan, check_schedule

# (schedule, n_stages, micro_batches, accumulation, n_batches) -> one line per stage
TABLES = {
    ("paci", 2, 3, 3, 2): [
        "F0 F1 B0 F2 B1 F3 B2 S F4 B3 F5 B4 B5 S",
        "F0 B0 F1 B1 F2 B2 S F3 B3 F4 B4 F5 B5 S",
    ],
    ("1f1b", 2, 3, 3, 2): [
        "F0 F1 B0 F2 B1 B2 S F3 F4 B3 F5 B4 B5 S",
        "F0 B0 F1 B1 F2 B2 S F3 B3 F4 B4 F5 B5 S",
    ],
    ("gpipe", 2, 3, 3, 2): [
        "F0 F1 F2 B0 B1 B2 S F3 F4 F5 B3 B4 B5 S",
        "F0 F1 F2 B0 B1 B2 S F3 F4 F5 B3 B4 B5 S",
    ],
    # a=2 < m=4: two steps per batch; PACI's drain (B6 B7 S on stage 0) closes the pipeline.
    ("paci", 3, 4, 2, 2): [
        "F0 F1 F2 B0 F3 B1 S F4 B2 F5 B3 S F6 B4 F7 B5 S B6 B7 S",
        "F0 F1 B0 F2 B1 S F3 B2 F4 B3 S F5 B4 F6 B5 S F7 B6 B7 S",
        "F0 B0 F1 B1 S F2 B2 F3 B3 S F4 B4 F5 B5 S F6 B6 F7 B7 S",
    ],
    ("1f1b", 3, 4, 2, 2): [
        "F0 F1 F2 B0 F3 B1 S B2 B3 S F4 F5 F6 B4 F7 B5 S B6 B7 S",
        "F0 F1 B0 F2 B1 S F3 B2 B3 S F4 F5 B4 F6 B5 S F7 B6 B7 S",
        "F0 B0 F1 B1 S F2 B2 F3 B3 S F4 B4 F5 B5 S F6 B6 F7 B7 S",
    ],
    ("gpipe", 3, 4, 2, 2): [
        "F0 F1 F2 F3 B0 B1 S B2 B3 S F4 F5 F6 F7 B4 B5 S B6 B7 S",
        "F0 F1 F2 F3 B0 B1 S B2 B3 S F4 F5 F6 F7 B4 B5 S B6 B7 S",
        "F0 F1 F2 F3 B0 B1 S B2 B3 S F4 F5 F6 F7 B4 B5 S B6 B7 S",
    ],
    # m=1 < N-1: PACI keeps forwarding across batches; 1F1B's warm-up is cut to m.
    ("paci", 3, 1, 1, 2): [
        "F0 F1 B0 S B1 S",
        "F0 F1 B0 S B1 S",
        "F0 B0 S F1 B1 S",
    ],
    ("1f1b", 3, 1, 1, 2): [
        "F0 B0 S F1 B1 S",
        "F0 B0 S F1 B1 S",
        "F0 B0 S F1 B1 S",
    ],
    # a=2 does not divide m*n=3: the drain adds a step for the partial window.
    ("paci", 2, 3, 2, 1): [
        "F0 F1 B0 F2 B1 S B2 S",
        "F0 B0 F1 B1 S F2 B2 S",
    ],
}


GRID = [(s, n, m, a, k) for s in SCHEDULES for n in range(1, 6) for m in range(1, 9)
        for a in sorted({1, 2, m, 2 * m}) for k in range(1, 5)]


@pytest.mark.parametrize("key", list(TABLES), ids=lambda k: "-".join(map(str, k)))
def test_literal_tables(key: tuple) -> None:
    schedule, n, m, a, k = key
    plan = build_plan(schedule, n, m, a, k)
    assert [format_actions(acts) for acts in plan.stages] == TABLES[key]


def test_text_form_round_trip() -> None:
    assert format_actions(parse_actions("F0 F12 B0 S B12 S")) == "F0 F12 B0 S B12 S"
    assert parse_actions("  F0\tB0  S ") == parse_actions("F0 B0 S")
    for schedule in SCHEDULES:
        for acts in build_plan(schedule, 4, 5, 2, 3).stages:
            assert parse_actions(format_actions(acts)) == acts


@pytest.mark.parametrize("bad", ["X1", "F", "S1", "f0", "B-1"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot parse"):
        parse_actions(bad)


def _plan(*stages: str, micro_batches: int = 2, accumulation: int = 2) -> Plan:
    return Plan("paci", len(stages), micro_batches, accumulation, 1, tuple(map(parse_actions, stages)))


def test_validate_accepts_hand_written_plan() -> None:
    validate(_plan("F0 F1 B0 B1 S", "F0 B0 F1 B1 S"))


@pytest.mark.parametrize("stages, message", [
    (("F0 F1 B0 B1", "F0 B0 F1 B1 S"), "no step after B1"),            # missing step
    (("F0 F1 B0 B1 S S", "F0 B0 F1 B1 S"), "step at slot 5"),          # extra step
    (("F0 F1 B0 S B1", "F0 B0 F1 B1 S"), "step at slot 3 after 1"),    # step in mid-window
    (("F0 B1 F1 B0 S", "F0 B0 F1 B1 S"), "in order"),                  # backwards out of order
    (("F0 B0 F1 B1 S", "F0 B0 B1 F1 S"), "precedes its forward"),      # B before F
    (("F0 F1 B0 B1 S", "F0 B0 S"), "cover micro-batches"),             # micro-batch missing
    (("F0 B0 F1 B1 S", "F0 F1 B0 B1 S"),  # both stages wait
     r"(?s)deadlock under gloo's rules.*stage 0 waits at wG0.*stage 1 waits at wA1"),
])
def test_validate_rejects(stages: tuple[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate(_plan(*stages))


def test_partial_window_left_open_is_rejected() -> None:
    plan = Plan("paci", 2, 3, 2, 1, (parse_actions("F0 F1 B0 F2 B1 S B2"),
                                     parse_actions("F0 B0 F1 B1 S F2 B2 S")))
    with pytest.raises(ValueError, match="stage 0: plan ends with 1 backwards not stepped"):
        validate(plan)


@pytest.mark.parametrize("schedule, n", [(s, n) for s in SCHEDULES for n in range(1, 6)])
def test_every_plan_is_valid_and_composes(schedule: str, n: int) -> None:
    for _, _, m, a, k in (g for g in GRID if g[:2] == (schedule, n)):
        spec = PlanSpec(schedule, n, m, a)
        plan = spec.plan(k)
        validate(plan)
        # The runtime asks for one batch at a time, then the drain: it must get the same plan.
        for i, acts in enumerate(plan.stages):
            pieces = [spec.batch(i, b) for b in range(k)] + [spec.drain(i, k)]
            assert sum(pieces, ()) == acts, (m, a, k, i)
        # Drained: every stage took the same steps, one per full window plus one for a partial one.
        steps = {sum(x.kind == "S" for x in acts) for acts in plan.stages}
        assert steps == {math.ceil(k * m / a)}, (m, a, k)


@pytest.mark.parametrize("schedule, n", [(s, n) for s in SCHEDULES for n in range(1, 6)])
def test_drift_and_in_flight(schedule: str, n: int) -> None:
    for _, _, m, a, k in (g for g in GRID if g[:2] == (schedule, n)):
        _check_drift_and_in_flight(PlanSpec(schedule, n, m, a).plan(k))


def _check_drift_and_in_flight(plan: Plan) -> None:
    n, m, a, k = plan.n_stages, plan.micro_batches, plan.accumulation, plan.n_batches
    for i, acts in enumerate(plan.stages):
        drift, peak, where = max_drift(acts), peak_in_flight(acts), (plan.schedule, n, m, a, k, i)
        if plan.schedule == "paci":
            # Steps follow B(a-1), B(2a-1), ...; B(j) crosses those among B(j-w)..B(j-1), w = N-1-i.
            # At most ceil(w/a) of them; the first B(j) to cross that many is j = a*ceil(w/a), so
            # the bound is reached iff that micro-batch exists: k*m > a*ceil(w/a).
            bound = drift_bound(i, n, a)
            assert drift <= bound, where
            assert (drift == bound) == (k * m > a * math.ceil((n - 1 - i) / a)), where
            assert peak == min(n - i, k * m), where  # the 1F1B bound N-i, once N-i micro-batches flow
        elif plan.schedule == "1f1b":
            assert peak == min(n - i, m), where
        else:
            assert peak == m, where
        if plan.schedule != "paci" and a % m == 0:
            assert drift == 0, where  # flush schedules then only step with the pipeline empty


def test_flush_schedule_with_accumulation_below_m_is_not_synchronous() -> None:
    # A flush schedule with a < m steps mid-batch, so stage 0's in-flight micro-batch 2 crosses a step.
    plan = build_plan("1f1b", 3, 4, 2, 1)
    assert format_actions(plan.stages[0]) == "F0 F1 F2 B0 F3 B1 S B2 B3 S"
    assert version_drift(plan.stages[0]) == {0: 0, 1: 0, 2: 1, 3: 1}


def test_drift_histogram_by_hand() -> None:
    plan = build_plan("paci", 3, 4, 2, 2)
    # Stage 0 (see TABLES): B0, B1 run before the first S; every later B crossed exactly one S.
    assert version_drift(plan.stages[0]) == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1}
    assert drift_histogram(plan.stages[0]) == {0: 2, 1: 6}
    assert drift_histogram(plan.stages[2]) == {0: 8}
    assert [max_drift(acts) for acts in build_plan("paci", 5, 8, 1, 1).stages] == [4, 3, 2, 1, 0]


def test_default_accumulation_is_micro_batches() -> None:
    assert build_plan("paci", 2, 3).accumulation == 3
    with pytest.raises(ValueError, match="unknown schedule"):
        build_plan("zb", 2, 3)


def test_strategy_names_are_accepted_as_schedules() -> None:
    # One name for one thing: PACIStrategy(schedule="pipe_1f1b") is the strategy named "pipe_1f1b".
    assert [check_schedule(n) for n in ("paci", "pipe_1f1b", "pipe_gpipe", "1f1b")] == ["paci", "1f1b", "gpipe",
                                                                                        "1f1b"]
    assert build_plan("pipe_1f1b", 2, 3).schedule == "1f1b"
