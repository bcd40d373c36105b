"""Every check of the user's input, each saying what to change.

``check_arguments`` runs in ``PACIStrategy.__init__``; ``check_devices``, ``check_module`` and
``check_last_batch`` run in the main process before any stage starts (the launchers call the strategy's
``_check_before_launch``) and ``check_module`` again on every stage (torchrun/SLURM start the stages
without a launcher); ``check_last_batch`` also runs when training starts (datamodules);
``check_lr_schedulers`` and ``check_optimizer_count`` run on every stage, where Lightning builds the
optimizer and its schedulers.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from lightning_paci.partition import PARTITIONS
from lightning_paci.plan import drift_bound

START_METHODS = ("popen", "spawn", "fork", "forkserver")


def check_arguments(micro_batches: Any, stages: int | None, partition: str, max_drift: int | None,
                    start_method: str) -> None:
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    if stages is not None and stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if partition not in PARTITIONS:
        raise ValueError(f"partition={partition!r} is not supported: choose one of {PARTITIONS}")
    if max_drift is not None and max_drift < 0:
        raise ValueError(f"max_drift must be >= 0, got {max_drift}")
    if start_method not in START_METHODS:
        raise ValueError(f"start_method={start_method!r}: choose one of {START_METHODS}")


def check_devices(stages: int | None, devices: int, shares_device: bool, backend: str | None) -> None:
    if stages is not None and devices % stages:
        raise ValueError(f"PACIStrategy(stages={stages}) needs one process per stage of each data-parallel "
                         f"replica, but the Trainer has {devices} devices x num_nodes: give it a multiple of "
                         f"{stages} ({stages} x R for R replicas), or devices=1 to run every stage on one device")
    if shares_device and backend not in (None, "gloo"):
        raise ValueError(f"{stages} stages share one device, which NCCL refuses (two ranks on one GPU); drop "
                         f"process_group_backend={backend!r} (gloo is used) or give the Trainer devices={stages}")


def check_module(module: LightningModule, trainer: Trainer, precision_plugin: Any, schedule: str,
                 n_stages: int, micro_batches: int, max_drift: int | None) -> None:
    if not module.automatic_optimization:
        raise ValueError("PACIStrategy runs forward, backward and each stage's optimizer step itself; "
                         "it needs automatic_optimization=True (remove `self.automatic_optimization = "
                         "False` and the manual_backward/optimizer.step calls from training_step)")
    if (trainer.gradient_clip_val and trainer.gradient_clip_algorithm != "value"
            and not is_overridden("configure_gradient_clipping", module)):
        raise ValueError("gradient_clip_val with clipping by norm needs the global gradient norm, a "
                         "sync across stages PACI avoids (PACI.md limits); use "
                         "gradient_clip_algorithm='value', drop gradient_clip_val, or override "
                         "configure_gradient_clipping (it then sees one stage's gradients)")
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        raise ValueError("val_check_interval given as a time lets each stage process decide by its own clock "
                         "when to validate (a drain point), so the stages would disagree: give it as a "
                         "number of batches (int) or a fraction of the epoch (float)")
    check_callbacks(trainer)
    if isinstance(precision_plugin, MixedPrecision) and precision_plugin.scaler is not None:
        raise ValueError("precision='16-mixed' needs a gradient scaler whose inf check spans all "
                         "stages; use precision='bf16-mixed' (or 32)")
    check_batch_norm(module, micro_batches)
    accumulation = micro_batches * trainer.accumulate_grad_batches
    if schedule == "paci" and max_drift is not None:
        bound = drift_bound(0, n_stages, accumulation)
        if bound > max_drift:
            if max_drift == 0:
                raise ValueError(f"max_drift=0 rules out the asynchronous schedule with {n_stages} "
                                 "stages; use schedule='1f1b' (pipe_1f1b) for zero drift")
            need = math.ceil((n_stages - 1) / (max_drift * trainer.accumulate_grad_batches))
            raise ValueError(f"PACI with {n_stages} stages and accumulation {accumulation} drifts "
                             f"up to {bound} updates > max_drift={max_drift}: use micro_batches>={need}")


def check_batch_norm(module: nn.Module, micro_batches: int) -> None:
    """Batch norm over a micro-batch normalizes with other statistics than over the batch on one device
    (and updates its running stats once per micro-batch): refused rather than silently different."""
    if micro_batches == 1:
        return
    names = [n for n, m in module.named_modules() if isinstance(m, _BatchNorm) and m.training]
    if names:
        raise ValueError(f"{names[:3]} normalize over the batch, but each stage sees micro-batches of "
                         f"1/{micro_batches} of it, so outputs and running statistics would differ from one "
                         "device. Use micro_batches=1, a norm within each sample (LayerNorm, GroupNorm), or "
                         "put these modules in eval mode (frozen statistics)")


def check_callbacks(trainer: Trainer) -> None:
    """Refuse callbacks that broadcast rank 0's clock after every training batch: each stage would wait
    for the last one once per batch (the bubble PACI removes). A collective at a drain point, an epoch
    end or a checkpoint is fine."""
    for callback in trainer.callbacks:
        if isinstance(callback, Timer) and callback._duration is not None and callback._interval == "step":
            raise ValueError("Trainer(max_time=...) / Timer(interval='step') broadcasts rank 0's clock after "
                             "every training batch, which stalls every pipeline stage once per batch; use "
                             "max_steps, or callbacks=[Timer(duration=..., interval='epoch')] to check the time "
                             "once per epoch")
        if isinstance(callback, ModelCheckpoint) and callback._train_time_interval is not None:
            raise ValueError("ModelCheckpoint(train_time_interval=...) broadcasts rank 0's clock after every "
                             "training batch, which stalls every pipeline stage once per batch; use "
                             "every_n_train_steps")


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


def check_optimizer_count(count: int | str) -> None:
    if count != 1:
        raise ValueError(f"configure_optimizers returned {count} optimizers; a pipeline stage steps "
                         "exactly one (put all parameters in one optimizer, with param groups if they "
                         "need different settings)")


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

