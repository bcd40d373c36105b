"""Lightning's backward and optimizer-step hooks, called where a stage's plan runs B and S.

[Note] On one device Lightning calls these around ``strategy.backward`` and inside
``optimizer.step``; the pipeline runs every backward and each stage's step itself (runtime.py), so
the strategy's ``backward``/``optimizer_step`` are no-ops and the runtime calls the hooks instead,
through the precision plugin as Lightning does (callbacks first, then the module):

- every ``B j`` (one micro-batch's backward): ``pre_backward`` -> ``on_before_backward(loss)``, the
  backward, then ``post_backward`` -> ``on_after_backward()``. ``loss`` is the micro-batch's loss
  divided by the accumulation ``a``, the tensor each backward accumulates, as Lightning passes
  ``loss / accumulate_grad_batches``. So a stage calls them once per micro-batch, as one device
  does with ``accumulate_grad_batches=micro_batches`` and batches of one micro-batch. Non-last
  stages get a detached copy of the loss (it came with the gradient from the next stage).
- every ``S``: ``on_before_optimizer_step(optimizer)``, then
  ``configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)``, on this
  stage's gradients only: ``grad_norm(self)`` gives the stage's norms, clipping by value is exact,
  and a norm computed in an override of ``configure_gradient_clipping`` is the stage's own.

Logging from these hooks: on the last stage (global rank 0, the logger's process) inside a
training batch, ``self.log`` goes to Lightning as usual. Everywhere else (other stages, and the
steps a drain takes) the values are recorded with their step and sent to rank 0 at the next point
where all stages meet anyway (epoch end, validation end, end of fit; no collective inside a
batch); rank 0 writes them to its loggers at their own steps, other stages' under ``<name>/stage<i>``.
They reach the loggers, not ``trainer.callback_metrics`` or the progress bar.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
from torch import Tensor


class StageHooks:
    """Calls the hooks for one stage and keeps what they log until it can reach rank 0."""

    def __init__(self, module: Any, precision: Any, stage: int, log_every_n_steps: int = 1) -> None:
        self.module, self.precision, self.stage = module, precision, stage
        self.log_every_n_steps = max(1, log_every_n_steps)
        self.direct = False  # True while the last stage runs a training batch: self.log works as usual
        self.pending: list[tuple[int, str, float]] = []  # (step, name, value)

    def before_backward(self, loss: Tensor, step: int) -> Tensor:
        with self._logging(step):
            return self.precision.pre_backward(loss, self.module)

    def after_backward(self, loss: Tensor, step: int) -> None:
        with self._logging(step):
            self.precision.post_backward(loss, self.module)

    def before_step(self, optimizer: Any, step: int) -> None:
        """``on_before_optimizer_step`` and ``configure_gradient_clipping`` (Lightning's own pair)."""
        with self._logging(step):
            self.precision._after_closure(self.module, optimizer)

    def take(self) -> list[tuple[int, str, float]]:
        pending, self.pending = self.pending, []
        return pending

    @contextmanager
    def _logging(self, step: int) -> Iterator[None]:
        if self.direct:
            yield
            return

        def record(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, (int, float)):
                raise ValueError(f"self.log({name!r}, ...) in a backward or optimizer-step hook on pipeline stage "
                                 f"{self.stage} logs a {type(value).__name__}; only scalars travel to the "
                                 "logger's "
                                 "process from there (log a float or a one-element tensor)")
            if (step + 1) % self.log_every_n_steps == 0:  # thinned as Lightning thins step logs
                self.pending.append((step, name, float(value)))

        outer = self.module.__dict__.get("log")  # logs.LogCapture's, if any: put back after
        self.module.log = record  # instance attribute shadows LightningModule.log (log_dict calls it too)
        try:
            yield
        finally:
            if outer is None:
                del self.module.log
            else:
                self.module.log = outer


def log_stage_records(gathered: list[tuple[int, list[tuple[int, str, float]]]], last_stage: int,
                      loggers: list[Any]) -> None:
    """On rank 0: write every stage's recorded hook values to the loggers at their own steps."""
    rows: dict[int, dict[str, float]] = {}
    for stage, records in gathered:
        for step, name, value in records:
            rows.setdefault(step, {})[name if stage == last_stage else f"{name}/stage{stage}"] = value
    for logger in loggers:
        for step in sorted(rows):
            logger.log_metrics(rows[step], step=step)


def send_to_rank_zero(hooks: StageHooks | None, stage: int, last_stage: int, loggers: list[Any]) -> None:
    """A collective (call it on every rank where all stages meet): recorded values to rank 0's loggers."""
    records = (stage, hooks.take() if hooks is not None else [])
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(records, gathered, dst=0)
    if gathered is not None:
        log_stage_records(gathered, last_stage, loggers)
