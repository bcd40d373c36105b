"""Throughput and wall-clock logging for the GPT recipe.

The clock counts training time only: time spent in validation is subtracted, so runs that validate
equally often compare by the time their schedule needs, and ``val/elapsed_s`` is the training
time at which the evaluated weights were reached (the x axis of compare.py).
"""

from __future__ import annotations

import time

import lightning as L


class TokenThroughput(L.Callback):
    """Logs ``perf/tokens_seen``, ``perf/elapsed_s`` and ``perf/tokens_per_s`` (running average)
    after every training batch, and ``val/elapsed_s`` and ``val/tokens_seen`` with every validation
    so each validation perplexity has its time and token count at the same step (and
    ``val/unigram_ppl``, the data module's context-free baseline, when it has one)."""

    def __init__(self) -> None:
        self.tokens = 0
        self._start = 0.0
        self._val_start = 0.0
        self._val_time = 0.0

    def _elapsed(self, now: float | None = None) -> float:
        return (time.perf_counter() if now is None else now) - self._start - self._val_time

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tokens, self._val_time, self._start = 0, 0.0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        x = batch[0]
        self.tokens += x.numel()
        elapsed = self._elapsed()
        pl_module.log_dict(
            {
                "perf/tokens_seen": float(self.tokens),
                "perf/elapsed_s": elapsed,
                "perf/tokens_per_s": self.tokens / max(elapsed, 1e-9),
            },
            on_step=True,
            on_epoch=False,
        )

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_batch_start(
        self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # Restart the validation clock at the first batch: a pipeline strategy drains after the
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
