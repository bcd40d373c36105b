"""Data-parallel replicas of a pipeline (DP x PP): R=2 copies of a 2-stage pipeline on 4 gloo processes.

Replica r reads samples r, r+2, ... through Lightning's DistributedSampler, so together the replicas'
batch k is the contiguous batch k of twice the size: a flush schedule must match one process trained
on that concatenated batch, and PACI the single-process replay of its plan on it (each replica's
micro-batch j side by side). Both runs go through tests/nccl_order.py, as the one-replica runs do.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lightning_paci import consolidate
from lightning_paci.mesh import PipelineLayout
from lightning_paci.partition import partition_model
from lightning_paci.plan import Plan, format_actions, parse_actions, validate
from lightning_paci.schedules import PlanSpec, build_plan
from lightning_paci.simulate import CostModel, simulate_schedule
from tests.models import token_data
from tests.reference import fresh_model, replay_plan, replica_batches, train_reference
from tests.test_pipeline_correctness import LAYERS, assert_same, run_pipeline

R, N, BATCH, M, STEPS = 2, 2, 8, 4, 3


def replica_params(tmp_path) -> dict:
    """Replica 1's parameters (replica 0's are what run_pipeline merges)."""
    merged: dict = {}
    for f in sorted(tmp_path.glob("replica1_stage*.pt")):
        merged.update(torch.load(f, map_location="cpu"))
    return merged


def test_layout_places_pipelines_on_consecutive_ranks():
    layout = PipelineLayout.for_world(4, 8)
    assert layout.rank(0, 3) == 0  # the last stage of replica 0 logs
    assert layout.pipeline_ranks(1) == [7, 6, 5, 4]  # one pipeline: one node of 4 devices
    assert layout.replica_ranks(0) == [3, 7]  # a stage's replicas: one per node
    assert [layout.place(r) for r in (0, 5)] == [(0, 3), (1, 2)]
    assert layout.neighbours(5) == (6, 4) and layout.neighbours(7) == (None, 6)
    try:
        PipelineLayout.for_world(3, 8)
    except ValueError as error:
        assert "devices x num_nodes = 3 x R" in str(error)
    else:
        raise AssertionError("8 processes cannot hold copies of a 3-stage pipeline")


def concatenated(per_replica: list[list[tuple]]) -> list[tuple]:
    return [tuple(torch.cat(parts) for parts in zip(*batch)) for batch in per_replica]


def side_by_side(per_replica: list[list[tuple]], micro_batches: int) -> list[tuple]:
    """Each step's batches joined so that micro-batch j of the result is every replica's micro-batch j
    (what one process replays for the replicas' averaged micro-batch j)."""
    out = []
    for batch in per_replica:
        chunks = [[t.chunk(micro_batches) for t in shard] for shard in batch]  # replica -> (xs, ys)
        out.append(tuple(torch.cat([c[i][j] for j in range(micro_batches) for c in chunks]) for i in (0, 1)))
    return out


def _run(tmp_path, schedule: str, *extra: str) -> tuple[dict, dict]:
    result, params = run_pipeline(tmp_path, "--nccl-order", "--schedule", schedule, "--stages", str(N),
                                  "--replicas", str(R), "--steps", str(STEPS), "--micro-batches", str(M),
                                  "--batch-size", str(BATCH), *extra, fork=False, timeout=120)
    assert result["state"] == "finished"
    assert_same(replica_params(tmp_path), params, tol=0)  # the replicas stepped on the same gradients
    steps = [(t["replica"], t["stage"], t["optimizer_steps"]) for t in result["telemetry"]]
    assert steps == [(r, i, STEPS) for r in range(R) for i in range(N)]  # telemetry per (replica, stage)
    return result, params


def test_1f1b_replicas_match_one_process_on_the_concatenated_batch(tmp_path):
    """Also: validation sharded over the replicas logs DDP's value (sync_dist's mean over the last stage's
    replicas), and the checkpoint holds each stage's share once, written by replica 0. The model ties
    wte and lm_head as nanoGPT does (stages 0 and 1): each replica's two copies sum their gradients
    after the replicas' mean (tied.py), which is one process's gradient of the concatenated batch."""
    result, params = _run(tmp_path, "1f1b", "--tied", "--validate", "--val-every", str(STEPS), "--ckpt-dir",
                          str(tmp_path / "ckpt"))
    tied = fresh_model(LAYERS)
    tied.model.transformer.wte.weight = tied.model.lm_head.weight
    expected = train_reference(LAYERS, concatenated(replica_batches(BATCH, STEPS, R)), lit=tied)
    assert_same(params, expected)
    model = fresh_model(LAYERS)
    model.load_state_dict(expected)
    x, y = token_data(2 * BATCH, seed=1)  # replica r validates on samples r, r+2, ...: together, all 16
    with torch.no_grad():
        val_loss = F.cross_entropy(model.model(x).flatten(0, 1), y.flatten()).item()
    assert abs(result["validated"]["val_loss"] - val_loss) < 1e-10
    (ckpt,) = (tmp_path / "ckpt").glob("epoch=0-step=3.ckpt")
    assert sorted(p.name for p in ckpt.glob("stage*.pt")) == ["stage0.pt", "stage1.pt"]
    out = consolidate(ckpt, tmp_path / "one.ckpt")
    assert_same(torch.load(out, weights_only=False)["state_dict"], expected)


def test_paci_replicas_match_the_replay_of_their_plan(tmp_path):
    _, params = _run(tmp_path, "paci", "--sched")
    partition = partition_model(fresh_model(LAYERS), N)
    units = [partition.stage_units(i) for i in range(N)]
    data = side_by_side(replica_batches(BATCH, STEPS, R), M)
    assert_same(params, replay_plan(PlanSpec("paci", N, M, M).plan(STEPS), units, LAYERS, data, sched=True))


def test_plans_with_replicas_all_reduce_before_each_windows_last_backward():
    plan = build_plan("paci", 2, 2, 4, n_batches=2, replicas=2)
    assert format_actions(plan.stages[1]) == "F0 B0 F1 B1 F2 B2 F3 R B3 S"
    assert format_actions(plan.stages[0]) == "F0 F1 B0 F2 B1 F3 B2 R B3 S"
    bad = [("F0 B0 S", "without an R"), ("F0 R B0 R S", "right before the backward"),
           ("R F0 B0 S", "right before the backward")]
    for text, message in bad:
        stages = (parse_actions(text),) * 2
        with pytest.raises(ValueError, match=message):
            validate(Plan("1f1b", 2, 1, 1, 1, stages, replicas=2))
    with pytest.raises(ValueError, match="one replica"):
        validate(Plan("1f1b", 2, 1, 1, 1, (parse_actions("F0 R B0 S"),) * 2))


@pytest.mark.parametrize("schedule", ["1f1b", "paci"])
def test_simulated_all_reduce_costs_only_what_the_last_backward_cannot_hide(schedule):
    """Each batch's period grows by max(0, allreduce - backward): the all-reduce runs beside the backward."""
    base = CostModel.uniform(4, 1.0, 2.0, 0.5)
    period = {ar: 8 / simulate_schedule(schedule, replace(base, allreduce=(ar,) * 4), 8, replicas=2).rate()
              for ar in (0.0, 2.0, 3.0, 5.0)}
    assert period[2.0] == pytest.approx(period[0.0])
    assert period[3.0] == pytest.approx(period[0.0] + 1.0)
    assert period[5.0] == pytest.approx(period[0.0] + 3.0)
