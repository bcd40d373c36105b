"""Multi-process pipeline runs (gloo, CPU, float64) against single-process references.

The schedule correctness runs go through tests/nccl_order.py: every send and receive of one process
group and rank pair runs one at a time in posted order, as on NCCL, so they prove the transport's
order of operations NCCL-safe as well as the numbers right.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_paci.comm import lower_plan
from lightning_paci.partition import partition_model
from lightning_paci.plan import drift_bound
from lightning_paci.schedules import PlanSpec
from tests.reference import batches, fresh_model, replay_plan, train_reference

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "pipeline_script.py"
LAYERS, BATCH, M, STEPS = 4, 8, 4, 5


def run_pipeline(tmp_path: Path, *args: str, timeout: float = 180, fork: bool = True) -> tuple[dict, dict]:
    """Launch the script; return (rank 0's result.json, all stages' parameters merged).

    ``fork`` starts the stages with Lightning's multiprocessing launcher (the main process then
    receives the whole model); otherwise the default popen launcher re-runs the script per rank
    and every stage saves its own parameters.
    """
    launcher = ["--start-method", "fork"] if fork else []
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), *launcher, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged: dict = {}
    for f in sorted(tmp_path.glob("stage*.pt")) + sorted(tmp_path.glob("model.pt")):
        part = torch.load(f, map_location="cpu")
        assert not set(part) & set(merged), "two stages hold the same parameter"
        merged.update(part)
    return json.loads((tmp_path / "result.json").read_text()), merged


def assert_ran_lowered_plan(out: Path, spec: PlanSpec, n_batches: int) -> None:
    """Each stage executed exactly the program validate() proves deadlock-free (comm.lower of the whole
    plan): the actions, and the operations as its StageLink carried them out, no more, none fewer, in order."""
    for i, program in enumerate(lower_plan(spec.plan(n_batches))):
        ran = json.loads((out / f"trace_stage{i}.json").read_text())
        assert ran == [str(op) for op in program], f"stage {i} ran {' '.join(ran)}"


def assert_same(actual: dict, expected: dict, tol: float = 1e-10) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=tol, atol=tol, msg=key)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_flush_schedules_match_single_process_training(tmp_path, schedule, stages):
    # The 3-stage runs also send activation headers on a group of their own (the NCCL layout), and a
    # grad-free mask and non-contiguous activations cross their boundaries (the model raises if the
    # mask arrives requiring grad; gradients land in contiguous buffers).
    # The 2-stage GPipe run puts both stage processes on one device (Trainer(devices=1), stages=2).
    extras = ["--host-headers", "--extras"] if stages == 3 else ["--shared-device"] if schedule == "gpipe" else []
    result, params = run_pipeline(tmp_path, "--nccl-order", "--trace", "--schedule", schedule, "--stages",
                                  str(stages), "--steps", str(STEPS), "--micro-batches", str(M), *extras)
    assert result["state"] == "finished"
    assert_ran_lowered_plan(tmp_path, PlanSpec(schedule, stages, M, M), STEPS)
    expected = train_reference(LAYERS, batches(BATCH, STEPS), extras="--extras" in extras)
    assert_same(params, expected)
    # Each process held only its own stage's parameters, and together they are the model.
    partition = partition_model(fresh_model(LAYERS), stages)
    held = [t["parameters"] for t in sorted(result["telemetry"], key=lambda t: t["stage"])]
    assert held == [partition.stage_params(i) for i in range(stages)]
    assert sum(held) == sum(v.numel() for k, v in expected.items())
    assert all(t["max_drift"] == 0 and t["optimizer_steps"] == STEPS for t in result["telemetry"])


@pytest.mark.parametrize("stages,micro_batches,fork", [(2, 4, False), (3, 1, True)])
def test_paci_matches_replay_of_its_plan_and_drift_bound(tmp_path, stages, micro_batches, fork):
    # The 2-stage run times its actions with a clock whose marks complete late, as CUDA events do.
    clock = [] if fork else ["--lagging-clock"]
    result, params = run_pipeline(tmp_path, "--nccl-order", "--trace", "--schedule", "paci", "--stages",
                                  str(stages), "--steps", str(STEPS), "--micro-batches", str(micro_batches),
                                  "--batch-size", "4", "--sched", *clock, fork=fork)
    spec = PlanSpec("paci", stages, micro_batches, micro_batches)
    assert_ran_lowered_plan(tmp_path, spec, STEPS)
    partition = partition_model(fresh_model(LAYERS), stages)
    units = [partition.stage_units(i) for i in range(stages)]
    expected = replay_plan(spec.plan(STEPS), units, LAYERS, batches(4, STEPS), sched=True)
    assert_same(params, expected)
    for t in result["telemetry"]:
        assert t["max_drift"] == drift_bound(t["stage"], stages, micro_batches)
        assert t["optimizer_steps"] == STEPS and t["skipped_windows"] == 0
        assert t["peak_in_flight"] <= stages - t["stage"]
        assert 0 < t["utilization"] and 0 <= t["bubble_fraction"]
        assert t["utilization"] + t["bubble_fraction"] <= 1 + 1e-9
        assert min(t["forward_s"], t["backward_s"], t["step_s"]) > 0
    # PACI really is asynchronous here: its result differs from synchronous training.
    with pytest.raises(AssertionError):
        assert_same(params, train_reference(LAYERS, batches(4, STEPS), sched=True))


def test_replay_of_flush_plans_is_the_single_process_reference():
    """The replay itself is right: on a flush plan it reproduces ordinary training."""
    partition = partition_model(fresh_model(LAYERS), 3)
    units = [partition.stage_units(i) for i in range(3)]
    expected = train_reference(LAYERS, batches(BATCH, 3))
    for schedule in ("gpipe", "1f1b"):
        plan = PlanSpec(schedule, 3, M, M).plan(3)
        assert_same(replay_plan(plan, units, LAYERS, batches(BATCH, 3)), expected)


def test_accumulate_grad_batches_and_dict_batches(tmp_path):
    """a = micro_batches x accumulate_grad_batches; dict batches and dict outputs; global_step counts steps."""
    result, params = run_pipeline(tmp_path, "--schedule", "1f1b", "--stages", "2", "--steps", "3",
                                  "--accumulate", "2", "--batch-format", "dict", fork=False)
    assert result["global_step"] == 3
    assert all(t["optimizer_steps"] == 3 for t in result["telemetry"])
    assert_same(params, train_reference(LAYERS, batches(BATCH, 3, accumulate=2), accumulate=2))


def test_one_shared_group_hangs_under_nccl_order(tmp_path):
    """The emulation bites: fedc153's layout (both directions on the default group) stops at the first
    backward under NCCL's order, as comm.check_transport predicts, and fails at the timeout."""
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--nccl-order", "--shared-group", "--timeout", "8",
           "--schedule", "1f1b", "--stages", "2", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "emulated NCCL order" in proc.stdout + proc.stderr


def test_skip_nonfinite_windows_matches_replay_with_those_windows_skipped(tmp_path):
    """skip_nonfinite_windows, both cases in one run (2 stages, m=4, a window per batch): the flag rides
    upstream with the gradients; a stage that skips drops the window's gradients without a step, its LR
    scheduler steps as usual; the rest of the run is untouched.

    - Stage 0's own gradient turns inf at its 10th backward (micro-batch 9, window 2): stage 0 skips
      window 2; stage 1 has stepped it already, with its finite gradients.
    - lm_head's output turns NaN during batch 3 (global step 3: micro-batches 12..15): every stage skips
      window 3.
    """
    faults = ["--nan-step", "3", "--inf-grad-unit", "model.transformer.h.0", "--inf-grad-at", "9"]
    result, params = run_pipeline(tmp_path, "--nccl-order", "--skip-nonfinite", "--schedule", "paci",
                                  "--stages", "2", "--steps", str(STEPS), "--batch-size", "4", "--sched", *faults)
    skipped = {0: {2, 3}, 1: {3}}
    partition = partition_model(fresh_model(LAYERS), 2)
    units = [partition.stage_units(i) for i in range(2)]
    expected = replay_plan(PlanSpec("paci", 2, M, M).plan(STEPS), units, LAYERS, batches(4, STEPS), sched=True,
                           skip=skipped)
    assert_same(params, expected)
    assert all(torch.isfinite(v).all() for v in params.values())
    telemetry = sorted(result["telemetry"], key=lambda t: t["stage"])
    assert [t["skipped_windows"] for t in telemetry] == [2, 1]
    assert all(t["optimizer_steps"] == STEPS for t in telemetry)
