"""Tied weights under PACI, planned (tiedplan.py): the lag read off the plan, and the tied messages
proved deadlock-free under gloo's and NCCL's rules (pure Python, no processes).

In the literal programs below stage 0 owns the tied weight and stage 1 holds a copy: the holder sends
its share of window w up before its S (``sT w>0``), waits for the owner's weight of window w-1 after it
(``wU``) and posts the receive of window w's (``rU``); the owner receives every share before its S
(``rT wT``), waits for its last weight send to leave (``WU``) and sends the new weight after it (``sU``).
"""

from __future__ import annotations

import pytest

from lightning_paci.comm import PER_DIRECTION, check_transport, lower_plan
from lightning_paci.plan import format_actions, parse_program
from lightning_paci.schedules import PlanSpec
from lightning_paci.tiedplan import check_tied, lower_tied, spec_lag, tied_lag

PROGRAMS = [  # PACI, 2 stages, m = a = 2, 2 batches, lag 1
    "F0 sA0 rG0 F1 sA1 rG1 wG0 B0 F2 sA2 rG2 wG1 B1 rT0>1 wT0>1 WU S sU0>1 F3 sA3 rG3 wG2 B2 wG3 B3 "
    "rT1>1 wT1>1 WU S sU1>1 W",
    "rA0 wA0 rA1 F0 B0 sG0 wA1 F1 B1 sG1 sT0>0 S rU0>0 rA2 wA2 rA3 F2 B2 sG2 wA3 F3 B3 sG3 sT1>0 S wU0>0 "
    "rU1>0 wU1>0 W",
]


def _programs(spec: PlanSpec, n_batches: int, lag: int, owner: int = 0, holders=(1,)) -> list:
    return [lower_tied(p, i, owner, list(holders), lag, 0, 0, drain=True)
            for i, p in enumerate(lower_plan(spec.plan(n_batches)))]


def test_tied_programs_literal_and_their_text_round_trips() -> None:
    programs = _programs(PlanSpec("paci", 2, 2, 2), 2, 1)
    assert [format_actions(p) for p in programs] == PROGRAMS
    assert [parse_program(text) for text in PROGRAMS] == programs


@pytest.mark.parametrize("n,m,a,lag", [
    (2, 2, 2, 1), (4, 4, 4, 1), (8, 8, 8, 1), (4, 4, 8, 1),  # micro_batches >= stages: one step
    (3, 2, 2, 2), (4, 2, 2, 2), (2, 1, 1, 2), (3, 1, 1, 3),  # fewer micro-batches than stages
    (4, 8, 2, 2),                                              # several windows per batch
])
def test_lag_read_off_the_plan(n, m, a, lag) -> None:
    assert spec_lag(PlanSpec("paci", n, m, a), 0, [n - 1]) == lag  # spec_lag also runs check_tied


def test_a_middle_holder_and_several_holders_are_deadlock_free() -> None:
    spec = PlanSpec("paci", 4, 4, 4)
    assert tied_lag(spec.plan(6), 0, 1) == 1
    check_tied(spec.plan(6), 0, [1, 3], spec_lag(spec, 0, [1, 3]))


def test_a_holder_waiting_for_the_weight_of_its_own_window_deadlocks() -> None:
    """lag 0 would be a synchronous exchange: the holder waits at S_w for what the owner sends only
    after adding the share the holder has just sent, and the receive is posted after that wait."""
    spec = PlanSpec("paci", 2, 2, 2)
    with pytest.raises(ValueError, match=r"(?s)deadlock under gloo.*stage 1 waits at wU0>0"):
        check_tied(spec.plan(3), 0, [1], 0)


def test_posting_the_weight_receive_before_the_share_send_hangs_on_nccl_only() -> None:
    """The holder's two operations in the other order: on NCCL's one stream per rank pair both ends
    would start with a receive."""
    programs = _programs(PlanSpec("paci", 2, 2, 2), 3, 1)
    holder = list(programs[1])
    for k, op in enumerate(holder):
        if str(op) == "sT0>0":
            holder[k], holder[k + 1], holder[k + 2] = holder[k + 2], holder[k + 1], holder[k]  # rU0 S sT0
            break
    swapped = [programs[0], tuple(holder)]
    check_transport(swapped, "gloo", PER_DIRECTION)
    with pytest.raises(ValueError, match="deadlock under nccl"):
        check_transport(swapped, "nccl", PER_DIRECTION)
