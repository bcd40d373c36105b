"""Checks of the user's setup that need more than a line: each says what to change.

``check_last_batch`` runs in the main process before any stage starts (when the DataLoader is
passed to ``fit``) and again on every stage when training starts (datamodules); the others run on
every stage, where Lightning builds what they look at.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader


def check_lr_schedulers(configs: list[Any]) -> None:
    """Each stage steps its own schedulers with its own optimizer, after every a-th backward."""
    for config in configs:
        name = type(config.scheduler).__name__
        if config.reduce_on_plateau:
            raise ValueError(f"{name} steps on a monitored metric, which only the last pipeline stage computes, "
                             "while each stage steps its own scheduler; use a scheduler driven by the step count "
                             "(LambdaLR, CosineAnnealingLR, OneCycleLR, ...) with interval='step'")
        if config.interval != "step":
            raise ValueError(f"{name} has interval={config.interval!r}: each stage steps its schedulers with its "
                             "own optimizer, so they must use interval='step'; return {'scheduler': ..., "
                             "'interval': 'step'} from configure_optimizers (and count in steps)")


def check_last_batch(loader: Any, micro_batches: int, max_steps: int = -1, accumulate: int = 1,
                     limit_batches: int | float = 1.0) -> None:
    """Fail now if a batch of the epoch, the last short one included, cannot be split into micro-batches
    (otherwise the run fails at the end of its first epoch)."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        return
    batch_size = loader.batch_size
    if batch_size % micro_batches:
        raise ValueError(f"batch size {batch_size} is not divisible by micro_batches={micro_batches}: make the "
                         "DataLoader's batch_size a multiple of micro_batches")
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return  # an iterable dataset: checked per batch
    tail, full = n % batch_size, n // batch_size
    if loader.drop_last or tail % micro_batches == 0:
        return
    if limit_batches != 1.0 or (max_steps != -1 and max_steps * accumulate <= full):
        return  # the epoch's last batch is never reached
    raise ValueError(f"the last batch of every epoch has {tail} samples (dataset of {n}, batch_size={batch_size}, "
                     f"drop_last=False), which micro_batches={micro_batches} cannot split: use drop_last=True, "
                     "or make the dataset's remainder a multiple of micro_batches")


def warn_if_schedule_changed(path: Any, saved: dict[str, Any], layout: dict[str, Any]) -> None:
    if saved.get("schedule") != layout["schedule"]:
        rank_zero_warn(f"{path} was saved by a {saved.get('schedule')!r} run and this run resumes it with "
                       f"schedule={layout['schedule']!r}: weights and optimizer state carry over, but the "
                       "schedule changed (PACI's updates cross in-flight micro-batches, flush schedules' do not)")
