"""How PACIStrategy plugs into Lightning beyond the Strategy API: its launchers and its fit-loop changes.

- The launchers run the strategy's input checks in the main process before any stage process
  starts (bad input fails there, with one message), and the multiprocessing one hands the main
  process the whole trained model and the pipeline telemetry, not rank 0's stage only.
- The fit loop's per-batch SIGTERM broadcast, a collective, is replaced by a local check, and a
  callback makes the last stage's metrics visible on every stage at epoch and validation ends.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
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


class PipelineSync(Callback):
    """Runs first among callbacks: makes the last stage's metrics visible on every stage."""

    def __init__(self, strategy: PACIStrategy) -> None:
        self.strategy = strategy

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.strategy.sync_metrics()
            if trainer.state.fn == TrainerFn.FITTING:
                self.strategy.publish_telemetry()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.sync_metrics()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.check_loader(trainer, trainer.train_dataloader)  # loaders of a datamodule exist now


class _ChecksBeforeLaunch:
    check: Callable[[Trainer, tuple], None]  # given the arguments of fit/validate/... (loaders among them)

    def launch(self, function: Callable, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        if trainer is not None:
            self.check(trainer, args)
        return super().launch(function, *args, trainer=trainer, **kwargs)


class CheckedScriptLauncher(_ChecksBeforeLaunch, _SubprocessScriptLauncher):
    pass


class CheckedMultiprocessingLauncher(_ChecksBeforeLaunch, _MultiProcessingLauncher):
    """Hands the main process the whole trained model and the telemetry, not rank 0's stage only."""

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
