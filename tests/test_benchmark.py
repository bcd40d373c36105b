"""recipes/benchmark.py: a tiny configuration end to end, and its summary arithmetic.

No timing is asserted here: the speed goals are read from the benchmark's own numbers
(BENCHMARKS.md), never from timed tests on a shared machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_paci.schedules import PlanSpec
from lightning_paci.simulate import CostModel, run_plan
from lightning_paci.timeline import TimelineEvent
from recipes.benchmark import _loss_into_forward
from recipes.benchmark_config import parse
from recipes.benchmark_report import OURS, PIPELINES, SINGLES, goals, replay_ceiling, summarize, time_budget

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--batch-size", "8",
        "--steps", "4", "--warmup-steps", "1", "--rounds", "1", "--max-bytes", "300000", "--quiet-wait-s", "0"]
STAGE_KEYS = {"stage", "utilization", "bubble_fraction", "peak_memory_bytes", "run_memory_bytes", "max_drift",
              "forward_s", "backward_s", "step_s"}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_tiny_benchmark_runs_and_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "recipes" / "benchmark.py"), *TINY, "--out", str(out),
           "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "benchmark.json").read_text())

    fields = {"command", "config", "machine", "model", "summary", "goals", "simulator", "artifacts", "runs"}
    assert fields <= set(result)
    assert result["config"]["steps"] == 4 and result["machine"]["backend"] == "gloo"
    assert len(result["runs"]) == len(PIPELINES) + len(SINGLES)
    summary = result["summary"]
    assert set(summary) == set(PIPELINES) | set(SINGLES)
    for name, row in summary.items():
        for key in ("tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "spread", "vs_pipe_1f1b",
                    "vs_peer_1f1b", "loss_last"):
            assert row[key] > 0 or key == "spread", (name, key)
        if name in SINGLES:
            assert row["stages"][0]["peak_memory_bytes"] > 0
            continue
        assert [s["stage"] for s in row["stages"]] == [0, 1]
        for stage in row["stages"]:
            assert STAGE_KEYS <= set(stage), (name, STAGE_KEYS - set(stage))
            assert 0 < stage["utilization"] <= 1 and stage["peak_memory_bytes"] > 0
    assert summary["pipe_1f1b"]["vs_pipe_1f1b"] == summary["peer_1f1b"]["vs_peer_1f1b"] == 1.0
    # Same model, same batches: the synchronous runs end at the same loss (float32, different order of sums).
    flush = [summary[name]["loss_last"] for name in ("peer_gpipe", "peer_1f1b", "pipe_gpipe", "pipe_1f1b")]
    assert max(flush) - min(flush) < 1e-3, flush
    # Drift is a property of the schedule, not of timing: PACI's first stage crosses one update.
    assert [s["max_drift"] for s in summary["paci"]["stages"]] == [1, 0]
    assert all(summary[name]["stages"][0]["max_drift"] == 0 for name in OURS if name != "paci")

    assert len(result["goals"]) == 4 and all(isinstance(g["met"], bool) for g in result["goals"])
    assert result["simulator"]["shared"]["predicted_paci_vs_pipe_1f1b"] > 1.0
    concurrency = result["machine"]["concurrency"]
    assert concurrency["parallel_speedup"] > 0 and concurrency["alone_cv"] >= 0 and concurrency["together_cv"] >= 0
    assert concurrency["rank_spread"] >= 0
    assert len(concurrency["rank_spread_per_round"]) == len(concurrency["parallel_speedup_per_round"])
    assert json.loads((out / "costs.json").read_text())["stages"][1]["backward_s"] > 0
    for path in result["artifacts"].values():
        assert Path(path).stat().st_size > 0
    for name in OURS:  # the idle time is split up, and the parts add up to the whole window
        for stage in summary[name]["stages"]:
            parts = [stage[f"{k}_fraction"] for k in ("compute", "wait", "between_actions", "between_batches")]
            assert sum(parts) == pytest.approx(1.0, abs=0.02) and min(parts) >= 0, (name, parts)
            assert stage["compute_fraction"] == pytest.approx(stage["utilization"], abs=0.02)
        assert max(s["balance_ceiling"] for s in summary[name]["stages"]) == pytest.approx(1.0, abs=0.2)
    for name in PIPELINES:  # every pipelined run, the peer's too, replays as our plan
        for stage in summary[name]["stages"]:
            assert 0 < stage["replay_utilization"] <= 1 and stage["overhead_fraction"] < 1, (name, stage)
            assert stage["forward_cv"] >= 0 and stage["backward_cv"] >= 0, (name, stage)
    trace = json.loads((out / "trace.json").read_text())["traceEvents"]
    assert {e["name"] for e in trace if e["ph"] == "X"} >= {"F0", "B0", "S"}
    # A stored run can be summarized again, with the same verdicts.
    again = subprocess.run([sys.executable, "-m", "recipes.benchmark_report", str(out / "benchmark.json")],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0, again.stderr
    assert "at equal compute speed: pipe_1f1b / peer_1f1b" in again.stdout
    assert sum(line.startswith(("MET", "MISSED")) for line in again.stdout.splitlines()) == 4


def _run(name: str, r: int, tps: float, util: float = 1.0, memory: int = 100) -> dict:
    stages = [{"stage": i, "utilization": util, "bubble_fraction": 1 - util, "peak_memory_bytes": memory,
               "run_memory_bytes": memory, "max_drift": 0} for i in range(2)]
    return {"name": name, "round": r, "tokens_per_s": tps, "loss_last": 1.0, "stages": stages}


def test_ratios_are_taken_per_round_then_medianed() -> None:
    cfg = parse(["--rounds", "3"])
    runs = []
    for r, scale in enumerate((1.0, 2.0, 0.5)):  # machine speed varies between rounds
        runs += [_run("peer_1f1b", r, 100 * scale), _run("pipe_1f1b", r, 98 * scale),
                 _run("paci", r, 122 * scale, util=0.97, memory=101)]
    summary = summarize(cfg, runs)
    assert summary["paci"]["vs_pipe_1f1b"] == pytest.approx(122 / 98)
    assert summary["paci"]["vs_pipe_1f1b_min"] == pytest.approx(summary["paci"]["vs_pipe_1f1b_max"])
    assert summary["pipe_1f1b"]["vs_peer_1f1b"] == pytest.approx(0.98)
    assert summary["paci"]["tokens_per_s"] == 122 and summary["paci"]["spread"] == pytest.approx(1.5)
    verdicts = {g["goal"].split(",")[0]: g["met"] for g in goals(cfg, summary)}
    assert list(verdicts.values()) == [True, True, True, True]


def test_equal_compute_ratio_cancels_the_machines_speed_between_runs() -> None:
    cfg = parse(["--rounds", "2", "--micro-batches", "4"])

    def timed(name: str, r: int, tps: float, slow: float) -> dict:  # slow: the machine's speed in this run
        run = _run(name, r, tps / slow)
        for stage in run["stages"]:
            stage.update(forward_s=0.01 * slow, backward_s=0.02 * slow, step_s=0.005 * slow)
        return run

    # Round 0: the peer ran on a machine 20% slower; round 1: ours did. The work is the same.
    runs = [timed("peer_1f1b", 0, 100, 1.2), timed("pipe_1f1b", 0, 98, 1.0),
            timed("peer_1f1b", 1, 100, 1.0), timed("pipe_1f1b", 1, 98, 1.2)]
    row = summarize(cfg, runs)["pipe_1f1b"]
    assert (row["vs_peer_1f1b_min"], row["vs_peer_1f1b_max"]) == pytest.approx((0.98 / 1.2, 0.98 * 1.2))
    assert row["vs_peer_1f1b_equal_compute_per_round"] == pytest.approx([0.98, 0.98])
    assert row["compute_vs_peer_1f1b"] == pytest.approx((1 / 1.2 + 1.2) / 2)  # median of the two rounds


def test_bad_settings_fail_with_a_message() -> None:
    with pytest.raises(SystemExit):
        parse(["--batch-size", "6", "--micro-batches", "4"])
    with pytest.raises(SystemExit):
        parse(["--steps", "3", "--warmup-steps", "3"])
    with pytest.raises(SystemExit):
        parse(["--steps", "6", "--warmup-steps", "3", "--cooldown-steps", "2"])  # one timed step


def test_time_budget_splits_idle_time_into_waits_bookkeeping_and_the_loop() -> None:
    events = [TimelineEvent(0, "F0", 1.0, 3.0), TimelineEvent(0, "recv B0", 3.5, 4.0),
              TimelineEvent(0, "B0", 4.0, 6.0), TimelineEvent(0, "S", 6.0, 7.0),
              TimelineEvent(0, "recv F1", 9.0, 9.5), TimelineEvent(0, "F1", 9.5, 11.0)]
    budget = time_budget(events, {"F0", "F1"}, (0.0, 12.0))
    # 0-1 and 7-9: before a batch's first action (the trainer's loop); 3-3.5 and 11-12: bookkeeping.
    assert budget == pytest.approx({"compute": 6.5 / 12, "wait": 1.0 / 12, "between_actions": 1.5 / 12,
                                    "between_batches": 3.0 / 12})
    clipped = time_budget(events, {"F0", "F1"}, (2.0, 5.0))  # events cut at the window's edges
    assert clipped == pytest.approx({"compute": 2.0 / 3, "wait": 0.5 / 3, "between_actions": 0.5 / 3,
                                     "between_batches": 0.0})


def test_balance_ceiling_is_each_stages_work_over_the_busiest_stages() -> None:
    cfg = parse(["--rounds", "1", "--micro-batches", "4"])
    run = _run("paci", 0, 100.0)
    costs = [(0.020, 0.040, 0.010), (0.025, 0.045, 0.010)]  # per batch: 4 x 60 + 10 = 250 ms, 4 x 70 + 10 = 290 ms
    for stage, (f, b, step) in zip(run["stages"], costs):
        stage.update(forward_s=f, backward_s=b, step_s=step)
    ceilings = [s["balance_ceiling"] for s in summarize(cfg, [run])["paci"]["stages"]]
    assert ceilings == pytest.approx([250 / 290, 1.0])


@pytest.mark.parametrize(("schedule", "per_batch", "utilization"), [("paci", 6.0, 1.0), ("1f1b", 9.0, 2 / 3)])
def test_replay_ceiling_is_the_plans_utilization_with_the_runs_own_action_times(
        schedule: str, per_batch: float, utilization: float) -> None:
    # Steps 2..5 of 6 are timed (warm-up 1, cool-down 1); m=2, forward 1, backward 2, free step.
    cfg = parse(["--micro-batches", "2", "--batch-size", "4", "--steps", "6", "--warmup-steps", "1",
                 "--cooldown-steps", "1"])
    clean = run_plan(PlanSpec(schedule, 2, 2, 2).plan(6), CostModel.uniform(2))
    # The measured run spent 0.5 between every two actions and waited for its inputs: all dropped.
    measured = [e._replace(start=e.start + 0.5 * k, end=e.end + 0.5 * k)
                for k, e in enumerate(sorted(clean, key=lambda e: e.start))]
    measured += [TimelineEvent(e.stage, f"recv {e.action}", e.start - 0.2, e.start) for e in measured]
    ceiling = replay_ceiling(cfg, schedule, measured)
    assert ceiling["length"] == pytest.approx(4 * per_batch)  # PACI: no bubble; 1F1B: (m+N-1)/m slots per batch
    assert ceiling["utilization"] == pytest.approx([utilization] * 2)


def test_the_peers_loss_counts_as_part_of_its_forward_for_the_replay() -> None:
    events = [TimelineEvent(1, "F0", 0.0, 1.0), TimelineEvent(1, "loss", 1.0, 1.5),
              TimelineEvent(1, "B0", 1.5, 3.5), TimelineEvent(1, "S", 3.5, 4.0),
              TimelineEvent(0, "F0", 0.0, 1.0), TimelineEvent(0, "loss", 1.0, 1.0)]
    merged = _loss_into_forward(events)
    assert sorted((e.stage, e.action, e.duration) for e in merged) == [
        (0, "F0", 1.0), (1, "B0", 2.0), (1, "F0", 1.5), (1, "S", 0.5)]
