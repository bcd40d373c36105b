"""The CUDA path, on a machine with GPUs: ``python -m pytest -m gpu tests/test_gpu.py`` (skipped without CUDA).

- One GPU: two stage processes share it over gloo, CUDA tensors staged through host memory (NCCL
  refuses two ranks on one device): a smoke test of the CUDA compute path, the event clock and the
  allocator's peak memory.
- Two or more GPUs: one stage per GPU over NCCL, the transport the emulation in tests/nccl_order.py
  stands in for on CPU.
Both are checked against the same single-process references as the CPU runs.
"""

from __future__ import annotations

import pytest
import torch

from lightning_paci.partition import partition_model
from lightning_paci.plan import drift_bound
from lightning_paci.schedules import PlanSpec
from tests.reference import batches, fresh_model, replay_plan, train_reference
from tests.test_pipeline_correctness import LAYERS, STEPS, assert_same, run_pipeline

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check(result: dict, params: dict, schedule: str, stages: int) -> None:
    data = batches(8, STEPS)
    if schedule == "paci":
        units = [partition_model(fresh_model(LAYERS), stages).stage_units(i) for i in range(stages)]
        expected = replay_plan(PlanSpec("paci", stages, 4, 4).plan(STEPS), units, LAYERS, data)
    else:
        expected = train_reference(LAYERS, data)
    assert_same(params, expected, tol=1e-6)  # float64 on the GPU against float64 on the CPU
    for t in result["telemetry"]:
        assert t["optimizer_steps"] == STEPS and t["peak_memory_bytes"] > 0
        assert 0 < t["utilization"] <= 1 and t["utilization"] + t["bubble_fraction"] <= 1 + 1e-6
        if schedule == "paci":
            assert t["max_drift"] == drift_bound(t["stage"], stages, 4)


@pytest.mark.parametrize("schedule", ["1f1b", "paci"])
def test_two_stages_share_one_gpu_over_gloo(tmp_path, schedule):
    result, params = run_pipeline(tmp_path, "--accelerator", "cuda", "--shared-device", "--schedule", schedule,
                                  "--stages", "2", "--steps", str(STEPS), fork=False)
    _check(result, params, schedule, 2)


@pytest.mark.skipif(GPUS < 2, reason="NCCL needs one GPU per stage")
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "paci"])
def test_one_stage_per_gpu_over_nccl(tmp_path, schedule):
    stages = min(GPUS, 3)
    result, params = run_pipeline(tmp_path, "--accelerator", "cuda", "--schedule", schedule,
                                  "--stages", str(stages), "--steps", str(STEPS), fork=False)
    _check(result, params, schedule, stages)
