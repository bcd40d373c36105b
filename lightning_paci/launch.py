"""How PACIStrategy plugs into Lightning beyond the Strategy API: its launchers and its fit-loop changes.

- The launchers run the strategy's input checks in the main process before any stage process
  starts (bad input fails there, with one message), and the multiprocessing one hands the main
  process the whole trained model and the pipeline telemetry, not rank 0's stage only.
- The fit loop's per-batch SIGTERM broadcast, a collective, is replaced by a local check, and a
  callback makes the last stage's metrics visible on every stage at epoch and validation ends, and
  brings values logged in backward/step hooks on other stages to rank 0's loggers (hooks.py).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.strategies.launchers.multiprocessing import _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

if TYPE_CHECKING:
    from lightning_paci.strategy import PACIStrategy


def drop_per_batch_sigterm_broadcast(trainer: Trainer) -> None:
    """Lightning 2.6 broadcasts rank 0's SIGTERM flag before every training batch: a collective that
    makes all stages wait for each other once per batch and brings a bubble back (measured: PACI's
    speed-up over 1F1B-flush fell from 1.24 to 1.07, recipes/benchmark.py). Each stage checks its own
    flag instead; a stage that stops on SIGTERM ends its neighbours through the pipeline links."""
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(loop, "_broadcast_sigterm_tensor"):
        return  # another Lightning version: nothing to replace

    def check_locally() -> None:
        if trainer.received_sigterm:
            raise SIGTERMException()

    loop._broadcast_sigterm_tensor = check_locally


def drop_prediction_writers(trainer: Trainer) -> None:
    """Stages before the last have no predictions (their predict_step stops at the stage boundary):
    prediction writers run on the last stage, global rank 0, with every prediction."""
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, BasePredictionWriter)]


class PipelineSync(Callback):
    """Runs first among callbacks: makes the last stage's metrics visible on every stage."""

    def __init__(self, strategy: PACIStrategy) -> None:
        self.strategy = strategy

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.strategy.sync_metrics()
            if trainer.state.fn == TrainerFn.FITTING:
                self.strategy.send_hook_logs()
                self.strategy.publish_telemetry()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.sync_metrics()
        self.strategy.send_hook_logs()


class _ChecksBeforeLaunch:
    check: Callable[[Trainer], None]

    def launch(self, function: Callable, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        if trainer is not None:
            self.check(trainer)
        return super().launch(function, *args, trainer=trainer, **kwargs)


class CheckedScriptLauncher(_ChecksBeforeLaunch, _SubprocessScriptLauncher):
    pass


class CheckedMultiprocessingLauncher(_ChecksBeforeLaunch, _MultiProcessingLauncher):
    """Hands the main process the whole trained model, the telemetry and the predictions, not rank 0's
    stage only."""

    @override
    def _wrapping_function(self, process_idx: int, trainer: Trainer | None, function: Callable, *args: Any) -> None:
        if trainer is not None and trainer.state.fn == TrainerFn.PREDICTING:
            function = _returning_predictions(trainer, function)
        super()._wrapping_function(process_idx, trainer, function, *args)

    @override
    def _collect_rank_zero_results(self, trainer: Trainer, results: Any) -> Any:
        strategy = self._strategy
        fitted = trainer.state.fn == TrainerFn.FITTING and strategy.runtime is not None
        state_dict = strategy.full_state_dict() if fitted else None  # every rank takes part
        if strategy.local_rank != 0:
            return None
        weights_path = None
        if state_dict is not None:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            strategy.checkpoint_io.save_checkpoint(state_dict, weights_path)
        callback = trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", None)
        if trainer.state.fn == TrainerFn.PREDICTING:
            results = _ByValue(results)
        return _WorkerOutput(best, weights_path, trainer.state, results, self.get_extra_results(trainer))

    @override
    def get_extra_results(self, trainer: Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        extra["pipeline_telemetry"] = json.dumps(trainer.strategy.telemetry)
        return extra

    @override
    def update_main_process_results(self, trainer: Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        trainer.strategy.telemetry = json.loads(extra["pipeline_telemetry"])


def _returning_predictions(trainer: Trainer, function: Callable) -> Callable:
    """Lightning refuses ``return_predictions`` under spawn/fork because a DDP worker holds only its share
    of the predictions. Here rank 0, the last stage, holds all of them and its results go back to the
    main process (``_collect_rank_zero_results``), so the worker runs predict as a popen rank would:
    Lightning's check sees no multiprocessing launcher."""
    def run(*args: Any, **kwargs: Any) -> Any:
        strategy = trainer.strategy
        launcher, strategy._launcher = strategy._launcher, None
        try:
            return function(*args, **kwargs)
        finally:
            strategy._launcher = launcher
    return run


class _ByValue:
    """Unpickles as the object it wraps, which travels as bytes: tensors put in a multiprocessing queue
    travel as file descriptors of shared memory, gone once the worker has exited (the main process
    reads the queue only after joining its workers)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __reduce__(self) -> tuple[Callable, tuple[bytes]]:
        buffer = io.BytesIO()
        torch.save(self.obj, buffer)
        return _load_bytes, (buffer.getvalue(),)


def _load_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)
