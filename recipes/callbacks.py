"""Throughput and wall-clock logging for the GPT recipe.

The rates are Lightning's own ``ThroughputMonitor`` (``PipelineThroughput``: tokens as its items,
samples counted once per data-parallel replica). ``ValidationClock`` adds only what it lacks: the
training seconds and tokens at which each validated model was reached (``val/elapsed_s``,
``val/tokens_seen``, the x axes of compare.py). ``ThroughputMonitor`` cannot give those because

- it writes to the loggers only, on global rank 0, never to ``trainer.callback_metrics``: a value
  that compare.py and ``pretrain_gpt.report`` read must go through ``self.log`` (which also brings it
  back to the main process of a ``start_method: spawn`` run), at the validation's step;
- its training clock stops at the end of the last training batch before a validation and restarts
  after it, so a pipeline's drain before validation (the backwards and steps still owed: training
  work, lightning_paci/launch.py) counts as validation. This clock stops at the first validation
  batch instead.

Both clocks count training time only: time spent in validation is subtracted, so runs that validate
equally often compare by the time their schedule needs.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ThroughputMonitor


# Module functions, not lambdas: the callback is pickled into the stage processes (start_method: spawn).
def _sequences(batch: Any) -> int:
    return batch[0].size(0)  # the inputs x: (B, T) tokens


def _tokens(batch: Any) -> int:
    return batch[0].numel()


class PipelineThroughput(ThroughputMonitor):
    """``ThroughputMonitor`` for a pipeline: logs ``train/device/items_per_sec`` (tokens/s of one
    pipeline, a rolling average over ``window_size`` batches), ``train/lengths`` (tokens),
    ``train/time`` (training seconds) and, with R > 1 data-parallel replicas, ``train/items_per_sec``
    (all replicas).

    Lightning multiplies its per-process rates by the world size to get global ones, which counts
    every sample N times when the N stages of a pipeline read the same samples. The world size that
    fits is the number of processes that read distinct samples: the data-parallel replicas, as the
    strategy's ``distributed_sampler_kwargs`` say (1 for one process or one pipeline), assuming that
    each replica reads its own samples (Lightning's distributed sampler, or a dataset sharded by
    replica). It is passed to ``Throughput`` after ``ThroughputMonitor.setup`` builds it, because
    ``ThroughputMonitor`` passes ``world_size=trainer.world_size`` itself and refuses a second one."""

    def __init__(self, window_size: int = 50) -> None:
        super().__init__(batch_size_fn=_sequences, length_fn=_tokens, window_size=window_size)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        sampler = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
        for throughput in self._throughputs.values():
            throughput.world_size = sampler.get("num_replicas", 1)
        # The recipe reports tokens, not FLOPs (no measured peak on CPU either): no flops_per_batch.
        warnings.filterwarnings("ignore", message="When using the `ThroughputMonitor`, you need to define a "
                                                  "`flops_per_batch`")


class ValidationClock(L.Callback):
    """Logs ``val/elapsed_s`` and ``val/tokens_seen`` with every validation, so each validation
    perplexity has its training time and token count at the same step, and ``val/unigram_ppl`` (the
    data module's context-free baseline) when the data module has one."""

    def __init__(self) -> None:
        self.tokens = 0
        self._start = 0.0
        self._val_start = 0.0
        self._val_time = 0.0

    def _elapsed(self, now: float) -> float:
        return now - self._start - self._val_time

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tokens, self._val_time, self._start = 0, 0.0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.tokens += _tokens(batch)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_batch_start(
        self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # Restart the validation clock at the first batch: a pipeline strategy may drain after the
        # callbacks' on_validation_start, and finishing in-flight backwards is training work.
        if batch_idx == 0 and dataloader_idx == 0:
            self._val_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        at = {"val/elapsed_s": self._elapsed(self._val_start), "val/tokens_seen": float(self.tokens)}
        unigram = getattr(trainer.datamodule, "val_unigram_perplexity", None)
        if unigram is not None:  # compare.py's baseline line: the level of a model that ignores context
            at["val/unigram_ppl"] = float(unigram())
        pl_module.log_dict(at, sync_dist=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._val_time += time.perf_counter() - self._val_start
