"""Drain points under Lightning's own loop: validation, epoch ends, the end of fit, accumulation windows.

A run is compared with a single-process reference that knows only what Lightning does around the
strategy: its DistributedSampler's shuffling per epoch, its validation schedule, its accumulation
windows (every ``accumulate_grad_batches``-th batch of an epoch and the epoch's last batch) and the
hooks a user reads the model in. PACI runs are compared with a replay of their plan cut into
segments at the drain points; flush schedules with Lightning's own single-device run.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_paci.partition import partition_model
from lightning_paci.schedules import PlanSpec
from tests.models import LitTiny, loader, token_data
from tests.reference import batches, epoch_batches, fresh_model, replay_segments
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


def test_plan_steps_where_lightning_closes_windows():
    """closes={0, 2}: Lightning steps after batches 0 and 2 of 3 (a = 2 batches of 2 micro-batches: batch 2
    is an epoch's short last window). Stage 0 owes B5 and that window's step at the drain; with
    closes={0} the window stays open through the drain (a validation inside it): no step."""
    spec = PlanSpec("paci", 2, 2, 4)
    text = lambda plan: [" ".join(map(str, actions)) for actions in plan.stages]  # noqa: E731
    assert text(spec.plan(3, closes={0, 2})) == ["F0 F1 B0 F2 B1 S F3 B2 F4 B3 F5 B4 B5 S",
                                                 "F0 B0 F1 B1 S F2 B2 F3 B3 F4 B4 F5 B5 S"]
    assert text(spec.plan(3, closes={0})) == ["F0 F1 B0 F2 B1 S F3 B2 F4 B3 F5 B4 B5",
                                              "F0 B0 F1 B1 S F2 B2 F3 B3 F4 B4 F5 B5"]
    assert text(spec.plan(3)) == ["F0 F1 B0 F2 B1 F3 B2 F4 B3 S F5 B4 B5 S",  # fixed windows: every 4th
                                  "F0 B0 F1 B1 F2 B2 F3 B3 S F4 B4 F5 B5 S"]


def _lightning_single_device(steps: int, epoch_batches: int, accumulate: int, val_every: int) -> tuple:
    """Lightning's own one-device run of pipeline_script's configuration: its accumulation windows."""
    L.seed_everything(0, verbose=False)
    model = LitTiny(dtype=torch.float64, sched=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, accumulate_grad_batches=accumulate, val_check_interval=val_every,
                        check_val_every_n_epoch=None, limit_val_batches=2)
    trainer.fit(model, loader(8, n=8 * epoch_batches), loader(8, n=16, seed=1))
    return model.state_dict(), float(trainer.callback_metrics["val_loss"])


@pytest.mark.parametrize("schedule", ["1f1b", "paci"])
def test_accumulation_windows_follow_lightning_across_epoch_ends_and_validation(tmp_path, schedule):
    """accumulate_grad_batches=2 over epochs of 3 batches: Lightning steps after batches 2 and 3 of each
    epoch (the last window of an epoch is short), and a validation after batch 4 falls inside a window,
    which goes on accumulating after it. Every stage takes exactly Lightning's global_step steps."""
    result, params = run_pipeline(tmp_path, "--schedule", schedule, "--stages", "2", "--micro-batches", "4",
                                  "--accumulate", "2", "--sched", "--steps", "4", "--epoch-batches", "3",
                                  "--val-every", "4", "--val-total", fork=False)
    assert result["global_step"] == 4
    assert [t["optimizer_steps"] for t in result["telemetry"]] == [4, 4]
    if schedule == "1f1b":
        expected, val_loss = _lightning_single_device(4, 3, accumulate=2, val_every=4)
    else:
        # Segments between drains: epoch 0 (windows end at its batches 1 and 2), epoch 1 up to the
        # validation (window open), the rest of epoch 1 (windows end at its batches 0 and 1).
        spec = PlanSpec("paci", 2, 4, 8)
        plans = [spec.plan(3, closes={1, 2}), spec.plan(1, closes=set()), spec.plan(2, closes={0, 1})]
        snapshots = replay_segments(plans, _units(2), LAYERS, epoch_batches(8, 3, 2, shuffle=False), sched=True)
        expected, val_loss = snapshots[-1], _val_loss(snapshots[1], 8)
    assert_same(params, expected)
    assert result["metrics"]["val_loss"] == pytest.approx(val_loss, rel=1e-6)


def test_validation_by_wall_clock_is_refused_before_launch():
    """Each process would read its own clock: the stages would validate (and drain) at different batches."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="paci", val_check_interval="00:00:00:05",
                        max_steps=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="number of batches"):
        trainer.fit(LitTiny(), loader(), loader(seed=1))
    assert not torch.distributed.is_initialized()


def test_paci_tied_copies_are_equal_at_drains_and_match_the_replay(tmp_path):
    """nanoGPT's tying (wte = lm_head, stages 0 and 1) under PACI, validating after batches 2 and 4:
    segments of 2 and 2 batches. After each drain the last stage's copy is the first stage's weight."""
    result, params = run_pipeline(
        tmp_path, "--nccl-order", "--tied", "--schedule", "paci", "--stages", "2", "--micro-batches", "2",
        "--batch-size", "4", "--steps", "4", "--val-every", "2", fork=False)
    assert torch.equal(params["model.transformer.wte.weight"], params["model.lm_head.weight"])
    spec = PlanSpec("paci", 2, 2, 2)
    snapshots = replay_segments([spec.plan(2), spec.plan(2)], _units(2), LAYERS, batches(4, 4), tied_lag=1)
    assert_same(params, snapshots[-1])
    holder = result["telemetry"][1]
    assert (holder["tied_lag_bound"], holder["tied_lag_max"], holder["tied_lag_last"]) == (1, 1, 1)
