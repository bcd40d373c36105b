"""Drain points under Lightning's own loop: validation, epoch ends, the end of fit, accumulation windows.

A run is compared with a single-process reference that knows only what Lightning does around the
strategy: its DistributedSampler's shuffling per epoch, its validation schedule and the hooks a user
reads the model in. PACI runs are compared with a replay of their plan cut into segments at the
drain points.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_paci.partition import partition_model
from lightning_paci.schedules import PlanSpec
from tests.models import LitTiny, loader, token_data
from tests.reference import epoch_batches, fresh_model, replay_segments
from tests.test_pipeline_correctness import LAYERS, assert_same, run_pipeline


def _units(stages: int) -> list[list[str]]:
    partition = partition_model(fresh_model(LAYERS), stages)
    return [partition.stage_units(i) for i in range(stages)]


def _val_loss(state: dict, batch_size: int) -> float:
    """The validation loss of pipeline_script's validation set (2 batches of equal size) under ``state``."""
    model = fresh_model(LAYERS)
    model.load_state_dict(state)
    x, y = token_data(2 * batch_size, seed=1)
    with torch.no_grad():
        return float(F.cross_entropy(model.model(x).flatten(0, 1), y.flatten()))


def test_paci_with_validation_and_epochs_matches_replay_drained_at_those_points(tmp_path):
    """2 epochs of 5 shuffled batches, validation after batches 3 and 6 (counted across epochs), 8 steps.

    Drains: validation (3), epoch end (5), validation (6), end of fit (8), so the replay runs segments
    of 3, 2, 1 and 2 batches. Every hook where a user reads the model sees the replay's weights there.
    """
    result, params = run_pipeline(
        tmp_path, "--schedule", "paci", "--stages", "2", "--micro-batches", "2", "--batch-size", "4",
        "--sched", "--shuffle", "--steps", "8", "--epoch-batches", "5", "--val-every", "3", "--val-total",
        "--record-hooks", fork=False)
    spec = PlanSpec("paci", 2, 2, 2)
    data = epoch_batches(4, 5, epochs=2, shuffle=True)[:8]
    snapshots = replay_segments([spec.plan(n) for n in (3, 2, 1, 2)], _units(2), LAYERS, data, sched=True)
    assert_same(params, snapshots[-1])
    assert result["global_step"] == 8
    assert all(t["optimizer_steps"] == 8 for t in result["telemetry"])

    expected = [("on_validation_start", 0), ("on_train_epoch_end", 1), ("on_validation_start", 2),
                ("on_train_epoch_end", 3), ("on_train_end", 3), ("on_fit_end", 3)]
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"hooks_rank{rank}.pt")
        weights = [(hook, own) for hook, own in seen if hook != "val_loss"]
        assert [hook for hook, _ in weights] == [hook for hook, _ in expected]
        for (hook, own), (_, index) in zip(weights, expected):
            reference = {k: v for k, v in snapshots[index].items() if k in own}
            try:
                assert_same(own, reference)
            except AssertionError as error:
                raise AssertionError(f"rank {rank} at {hook} (drain {index}): {error}") from None
    val_losses = [value for hook, value in torch.load(tmp_path / "hooks_rank0.pt") if hook == "val_loss"]
    assert val_losses == pytest.approx([_val_loss(snapshots[0], 4), _val_loss(snapshots[2], 4)], rel=1e-6)


def test_validation_by_wall_clock_is_refused_before_launch():
    """Each process would read its own clock: the stages would validate (and drain) at different batches."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="paci", val_check_interval="00:00:00:05",
                        max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="number of batches"):
        trainer.fit(LitTiny(), loader(), loader(seed=1))
    assert not torch.distributed.is_initialized()
