"""The simulator against closed forms and a hand-computed timeline (pure Python, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_paci.schedules import build_plan
from lightning_paci.simulate import (
    CostModel,
    replay,
    run_plan,
    simulate,
    simulate_schedule,
    steady_batches,
)
from lightning_paci.simulate_cli import main
from lightning_paci.timeline import TimelineEvent, chrome_trace

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("backward", [1.0, 2.0])
def test_flush_bubble_is_closed_form(schedule: str, backward: float) -> None:
    for n in range(1, 7):
        for m in range(1, 9):
            costs = CostModel.uniform(n, 1.0, backward)
            one = simulate(build_plan(schedule, n, m), costs)  # one batch: warm-up and flush only
            assert one.makespan == pytest.approx((m + n - 1) * (1.0 + backward)), (n, m)
            for s in one.stages:
                assert s.bubble == pytest.approx((n - 1) / (m + n - 1)), (n, m, s.stage)
            many = simulate_schedule(schedule, costs, m)  # every batch repeats the flush
            assert many.bubble(steady=True) == pytest.approx((n - 1) / (m + n - 1)), (n, m)


@pytest.mark.parametrize("backward", [1.0, 2.0, 3.0])
def test_paci_steady_state_has_no_bubble(backward: float) -> None:
    for n in range(1, 7):
        for m in range(1, 9):
            r = simulate_schedule("paci", CostModel.uniform(n, 1.0, backward), m)
            assert r.window is not None
            for s in r.stages:
                assert s.steady_utilization == pytest.approx(1.0, abs=1e-9), (n, m, s.stage)
            assert r.steady_throughput == pytest.approx(1 / (1.0 + backward)), (n, m)
            if n > 1:
                assert r.stages[0].utilization < 1.0  # the whole run still pays warm-up and drain once


# The paper's bubble model for N=8: paci / 1f1b-flush throughput = (m+N-1)/m.
N8_RATIOS = {4: 2.75, 8: 1.875, 16: 1.4375, 24: 1.2917, 32: 1.21875, 40: 1.175}


@pytest.mark.parametrize("backward", [1.0, 2.0])  # the closed form holds for any equal-per-stage b/f
@pytest.mark.parametrize("m", list(N8_RATIOS))
def test_n8_throughput_ratio(m: int, backward: float) -> None:
    costs = CostModel.uniform(8, 1.0, backward)
    paci, flush = simulate_schedule("paci", costs, m), simulate_schedule("pipe_1f1b", costs, m)
    ratio = paci.rate() / flush.rate()
    assert ratio == pytest.approx((m + 7) / m, rel=1e-12)
    assert ratio == pytest.approx(N8_RATIOS[m], abs=5e-5)


def test_hand_computed_timeline() -> None:
    # paci, N=2, m=a=2, one batch: stage 0 runs "F0 F1 B0 B1 S", stage 1 "F0 B0 F1 B1 S".
    costs = CostModel(forward=[1.0, 1.5], backward=[2.0, 2.0], step=[0.5, 0.5], transfer=0.25)
    r = simulate(build_plan("paci", 2, 2), costs, record_waits=True)
    got = sorted((e.stage, e.start, e.action, e.end) for e in r.events)
    assert got == [
        (0, 0.0, "F0", 1.0),
        (0, 1.0, "F1", 2.0),
        (0, 2.0, "recv", 5.0),     # B0 arrives at 4.75 + 0.25
        (0, 5.0, "B0", 7.0),
        (0, 7.0, "recv", 8.5),     # B1 arrives at 8.25 + 0.25
        (0, 8.5, "B1", 10.5),
        (0, 10.5, "S", 11.0),
        (1, 0.0, "recv", 1.25),    # F0 arrives at 1.0 + 0.25
        (1, 1.25, "F0", 2.75),
        (1, 2.75, "B0", 4.75),
        (1, 4.75, "F1", 6.25),     # F1 arrived at 2.25, stage busy until 4.75
        (1, 6.25, "B1", 8.25),
        (1, 8.25, "S", 8.75),
    ]
    assert r.makespan == 11.0
    assert r.throughput == pytest.approx(2 / 11)
    assert [s.busy for s in r.stages] == [6.5, 7.5]
    assert [s.utilization for s in r.stages] == pytest.approx([6.5 / 11, 7.5 / 11])
    assert [(s.peak_in_flight, s.max_drift, s.steps) for s in r.stages] == [(2, 0, 1), (1, 0, 1)]
    assert r.window is None and r.rate() == r.throughput  # one batch has no steady window


def test_replay_retimes_a_measured_timeline_without_what_lies_between_actions() -> None:
    plan = build_plan("paci", 2, 2)
    costs = CostModel(forward=[1.0, 1.5], backward=[2.0, 2.0], step=[0.5, 0.5])
    clean = run_plan(plan, costs)
    # A "measured" run: 0.3 between actions on every stage, waits recorded, one slow backward.
    measured, clock = [], [0.0, 0.0]
    for e in sorted(clean, key=lambda e: (e.stage, e.start)):
        took = e.duration + (1.0 if (e.stage, e.action) == (1, "B0") else 0.0)
        start = clock[e.stage] + 0.3
        measured += [TimelineEvent(e.stage, f"recv {e.action}", start, start + 0.1),
                     TimelineEvent(e.stage, e.action, start + 0.1, start + 0.1 + took)]
        clock[e.stage] = start + 0.1 + took
    got = {(e.stage, e.action): (e.start, e.end) for e in replay(plan, measured)}
    want = {(e.stage, e.action): (e.start, e.end) for e in clean}
    # Everything before stage 1's B0 keeps its clean time; B0 takes 3.0 instead of 2.0 ...
    assert got[1, "F0"] == pytest.approx(want[1, "F0"]) and got[1, "B0"] == pytest.approx((2.5, 5.5))
    # ... and what depends on it moves by exactly that second: stage 0's B0 waits for its gradient.
    assert got[0, "B0"] == pytest.approx((5.5, 7.5))
    assert got[0, "S"] == pytest.approx((want[0, "S"][0] + 1.0, want[0, "S"][1] + 1.0))
    again = replay(plan, clean)  # a clean run replays as itself
    assert [(e.stage, e.action) for e in again] == [(e.stage, e.action) for e in clean]
    assert [e.end for e in again] == pytest.approx([e.end for e in clean])


def test_replay_refuses_a_timeline_that_is_not_the_plans() -> None:
    plan = build_plan("paci", 2, 2)
    events = list(run_plan(plan, CostModel.uniform(2)))
    swapped = [e._replace(action={"F0": "F1", "F1": "F0"}.get(e.action, e.action)) if e.stage == 0 else e
               for e in events]
    with pytest.raises(ValueError, match="stage 0's timeline does not follow the plan: action 0 is F1"):
        replay(plan, swapped)
    with pytest.raises(ValueError, match="stage 1's timeline .* action 4 is missing"):
        replay(plan, [e for e in events if (e.stage, e.action) != (1, "S")])


def test_steady_window_stays_clear_of_drain() -> None:
    assert steady_batches(16, 8, 8) == (4, 11)
    assert steady_batches(3, 8, 8) == (0, 1)
    assert steady_batches(2, 8, 8) is None
    assert steady_batches(8, 1, 8) is None  # 8 micro-batches on 8 stages: all warm-up and drain
    assert steady_batches(64, 1, 8) == (16, 47)


def test_cost_model_checks_sizes() -> None:
    with pytest.raises(ValueError, match="one forward, backward and step cost per stage"):
        CostModel([1.0, 1.0], [2.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="cost model has 2 stages, plan has 3"):
        simulate(build_plan("paci", 3, 2), CostModel.uniform(2))


def test_costs_from_telemetry_json() -> None:
    rows = [{"stage": 0, "forward_s": 1.0, "backward_s": 2.0, "step_s": 0.1, "wall_s": 9.0},
            {"stage": 1, "forward_s": 1.5, "backward_s": 3.0, "step_s": 0.2}]
    assert CostModel.from_json(rows) == CostModel([1.0, 1.5], [2.0, 3.0], [0.1, 0.2], 0.0)
    assert CostModel.from_json({"stages": rows, "transfer_s": 0.01}).transfer == 0.01
    with pytest.raises(ValueError, match=r"stages \[1\] lack 'step_s'"):
        CostModel.from_json([rows[0], {"forward_s": 1.0, "backward_s": 2.0, "stpe_s": 0.1}])


def test_schedule_names() -> None:
    # The registry names work here as everywhere (schedules.check_schedule); the CLI says what exists.
    assert simulate_schedule("pipe_1f1b", CostModel.uniform(2), 2, n_batches=1).plan.schedule == "1f1b"
    with pytest.raises(SystemExit, match="unknown schedule 'pipe_zb'.*pipe_gpipe"):
        main(["--stages", "2", "--schedules", "paci,pipe_zb"])


def test_cli_prints_tables_and_writes_gantt_and_trace(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gantt, trace = tmp_path / "gantt.png", tmp_path / "trace.json"
    main(["--stages", "4", "--micro-batches", "4", "--schedules", "paci,pipe_1f1b,gpipe",
          "--backward", "1", "--gantt", str(gantt), "--trace", str(trace), "--waits"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("pipe_", "paci "))}
    assert rows["paci"][5] == "1.75000"  # vs pipe_1f1b: (4 + 3) / 4
    assert rows["pipe_1f1b"][5] == "1.00000"
    assert "paci: per stage" in out and "pipe_gpipe: per stage" in out
    assert gantt.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = json.loads(trace.read_text())["traceEvents"]
    titles = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert titles == {"paci", "pipe_1f1b", "pipe_gpipe"}
    complete = [e for e in events if e["ph"] == "X"]
    assert {e["tid"] for e in complete} == {0, 1, 2, 3}
    assert {"forward", "backward", "step", "wait"} <= {e["cat"] for e in complete}


def test_cli_reads_costs_and_sweeps_micro_batches(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    costs = tmp_path / "telemetry.json"
    costs.write_text(json.dumps([{"forward_s": 1.0, "backward_s": 1.0, "step_s": 0.0}] * 8))
    main(["--costs", str(costs), "--micro-batches", "4,8", "--schedules", "paci"])
    ratios = [line.split()[5] for line in capsys.readouterr().out.splitlines() if line.startswith("paci ")]
    assert ratios == ["2.75000", "1.87500"]
    with pytest.raises(SystemExit, match="drop --forward"):
        main(["--costs", str(costs), "--forward", "1"])


def test_chrome_trace_is_microseconds_per_stage_track() -> None:
    trace = chrome_trace([TimelineEvent(1, "B3", 0.5, 0.75), TimelineEvent(0, "recv F3", 0.0, 0.5)])
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(e["tid"], e["name"], e["cat"], e["ts"], e["dur"], e["args"]) for e in complete] == [
        (0, "recv F3", "wait", 0.0, 500000.0, {}), (1, "B3", "backward", 500000.0, 250000.0, {"micro_batch": 3})]


def _imports_without(code: str, blocked: tuple[str, ...] = ("torch",)) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``blocked`` raises at once.

    Blocking, rather than importing and then checking sys.modules, keeps a regression fast.
    """
    guard = ("import sys\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             f"        if name.split('.')[0] in {blocked!r}:\n"
             "            raise ImportError(f'{name} is blocked in this test')\n"
             "sys.meta_path.insert(0, Block())\n")
    return subprocess.run([sys.executable, "-c", guard + code], cwd=REPO, capture_output=True, text=True,
                          check=False)


def test_planning_core_imports_no_torch() -> None:
    # The real package: its __init__ runs first and must not load torch (or Lightning) either;
    # matplotlib waits for plot_gantt.
    code = ("import lightning_paci.plan, lightning_paci.schedules, lightning_paci.simulate, "
            "lightning_paci.simulate_cli, lightning_paci.timeline, lightning_paci.comm, lightning_paci.dataflow\n")
    done = _imports_without(code, ("torch", "lightning", "matplotlib"))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("order", ["lightning first", "lightning_paci first", "strategy module only"])
def test_import_registers_strategy_names_in_any_order(order: str) -> None:
    first = {"lightning first": "import lightning as L\nimport lightning_paci\n",
             "lightning_paci first": "import lightning_paci\nimport lightning as L\n",
             "strategy module only": "from lightning_paci.strategy import PACIStrategy\nimport lightning as L\n"}
    code = first[order] + (
        "from lightning.pytorch.strategies import StrategyRegistry\n"
        "assert {'paci', 'pipe_1f1b', 'pipe_gpipe'} <= set(StrategyRegistry), list(StrategyRegistry)\n"
        "trainer = L.Trainer(strategy='pipe_gpipe', accelerator='cpu', devices=2, logger=False)\n"
        "assert type(trainer.strategy).__name__ == 'PACIStrategy' and trainer.strategy.schedule == 'gpipe'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
