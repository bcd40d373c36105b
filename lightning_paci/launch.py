"""How PACIStrategy plugs into Lightning beyond the Strategy API: its launchers and its fit-loop changes.

- The launchers run the strategy's input checks in the main process before any stage process
  starts (bad input fails there, with one message), and the multiprocessing one hands the main
  process the whole trained model and the pipeline telemetry, not rank 0's stage only.
- The popen launcher ends every stage process it started when the job fails (a stage stuck in its
  step never notices on its own), and a started stage ends itself if rank 0's process is gone.
- The fit loop's per-batch SIGTERM broadcast, a collective, is replaced by signals.py's boundary
  check, and a callback makes the last stage's metrics visible on every stage at epoch and
  validation ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.strategies.launchers.multiprocessing import _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

_LAUNCHER_PID = "LIGHTNING_PACI_LAUNCHER_PID"  # set by rank 0 for the stage processes it starts

if TYPE_CHECKING:
    from lightning_paci.signals import PipelineSignals
    from lightning_paci.strategy import PACIStrategy


def drop_per_batch_sigterm_broadcast(trainer: Trainer, signals: PipelineSignals) -> None:
    """Lightning 2.6 broadcasts rank 0's SIGTERM flag before every training batch: a collective that
    makes all stages wait for each other once per batch and brings a bubble back (measured: PACI's
    speed-up over 1F1B-flush fell from 1.24 to 1.07, recipes/benchmark.py). Each stage checks its own
    requests instead; signals.py agrees on the batch to stop at without a collective."""
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(loop, "_broadcast_sigterm_tensor"):
        return  # another Lightning version: nothing to replace
    loop._broadcast_sigterm_tensor = signals.at_batch_start


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
    """Lightning's popen launcher (rank 0 re-runs the script for ranks 1..), plus: when the job fails,
    every stage process it started ends. Rank 0 kills the ones still running once its own run has
    failed (a stage stuck in its step never notices on its own), and each started stage ends itself
    if rank 0's process disappears while a run is in progress (rank 0 killed)."""

    @override
    def launch(self, function: Callable, *args: Any, trainer: Trainer | None = None, **kwargs: Any) -> Any:
        watchdog = None
        if not self.cluster_environment.creates_processes_externally:
            os.environ[_LAUNCHER_PID] = str(os.getpid())  # the stage processes it starts inherit it
        elif os.environ.get(_LAUNCHER_PID) == str(os.getppid()):  # a stage process this launcher started
            watchdog = _ParentWatchdog(os.getppid())
            watchdog.start()
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except BaseException as error:
            # SIGTERM: every stage stops at the same batch and exits by itself (signals.py); otherwise a
            # stage blocked on this process or stuck in its step would outlive the job.
            self._end_stage_processes(grace_s=10.0 if isinstance(error, SIGTERMException) else 1.0)
            raise
        finally:
            if watchdog is not None:
                watchdog.done.set()

    def _end_stage_processes(self, grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for rank, proc in enumerate(self.procs, start=1):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"lightning_paci: the job failed; ending rank {rank} (pid {proc.pid}), still running",
                      file=sys.stderr, flush=True)
                proc.kill()
                proc.wait()


class _ParentWatchdog(threading.Thread):
    """In a stage process started by CheckedScriptLauncher: exit if rank 0's process is gone for
    ``grace_s`` while the run still goes on (after a normal end rank 0 may exit first: no harm)."""

    def __init__(self, parent: int, grace_s: float = 2.0) -> None:
        super().__init__(daemon=True, name="lightning_paci-parent-watchdog")
        self.parent, self.grace_s, self.done = parent, grace_s, threading.Event()

    @override
    def run(self) -> None:
        while not self.done.wait(0.5):
            if os.getppid() != self.parent and not self.done.wait(self.grace_s):
                print(f"lightning_paci: rank 0 (pid {self.parent}) is gone and this stage's run goes on; "
                      f"ending this stage process (pid {os.getpid()})", file=sys.stderr, flush=True)
                os._exit(1)


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
