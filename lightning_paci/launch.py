"""How PACIStrategy plugs into Lightning beyond the Strategy API: its launchers and its fit-loop changes.

- The launchers run the strategy's input checks in the main process before any stage process
  starts (bad input fails there, with one message), and the multiprocessing one hands the main
  process the whole trained model and the pipeline telemetry, not rank 0's stage only.
- The popen launcher ends every stage process it started when the job fails (a stage stuck in its
  step never notices on its own), and a started stage ends itself if rank 0's process is gone.
- The fit loop's per-batch SIGTERM broadcast, a collective, is replaced by signals.py's check, and a
  callback makes the last stage's metrics visible on every stage at epoch and validation ends and
  before a ModelCheckpoint compares a metric at a training step. Values logged in
  backward/step hooks on other stages reach rank 0's loggers (hooks.py).
- Drain points: the pipeline drains where the fit loop decides to validate, and first thing at
  every epoch end and at the end of training, so that no Lightning or user hook after training
  batches sees a stage with backwards or a step still owed (see ``drain_before_validation``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.strategies.launchers.multiprocessing import _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_paci.materialize import has_meta_tensors

_LAUNCHER_PID = "LIGHTNING_PACI_LAUNCHER_PID"  # set by rank 0 for the stage processes it starts

if TYPE_CHECKING:
    from lightning_paci.signals import PipelineSignals


class DrainPoints(Protocol):
    """What ``PipelineSync`` calls on the strategy (PACIStrategy is one); a Protocol, so this module does
    not import the strategy that imports it."""

    def drain(self) -> None: ...

    def sync_metrics(self) -> None: ...

    def send_hook_logs(self) -> None: ...

    def publish_telemetry(self) -> None: ...

    def check_loader(self, trainer: Trainer, loader: Any) -> None: ...


def drop_per_batch_sigterm_broadcast(trainer: Trainer, signals: PipelineSignals) -> None:
    """Lightning 2.6 broadcasts rank 0's SIGTERM flag before every training batch: a collective that
    makes all stages wait for each other once per batch and brings a bubble back (measured: PACI's
    speed-up over 1F1B-flush fell from 1.24 to 1.07, recipes/benchmark.py). Each stage checks its own
    requests instead; signals.py agrees on the batch to stop at without a collective."""
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(loop, "_broadcast_sigterm_tensor"):
        return  # another Lightning version: nothing to replace
    loop._broadcast_sigterm_tensor = signals.at_batch_start


def drain_before_validation(trainer: Trainer, drain: Callable[[], None]) -> None:
    """Drain as soon as the fit loop decides to validate.

    Lightning 2.6's ``on_advance_end`` decides (``_should_check_val_fx``), then calls the module's
    ``on_validation_model_zero_grad`` (``zero_grad()``) when a window has just ended, then the
    validation hooks (callbacks first, the strategy's ``on_validation_start`` last). Stage 0 is then
    still in the middle of its window: its owed backwards and its step come with the drain, and a
    zeroing before it wiped the window's earlier gradients (the step used only the rest). Draining
    inside the decision puts it before every one of those hooks, whatever the user overrides.
    """
    loop = trainer.fit_loop.epoch_loop
    decide = getattr(loop, "_should_check_val_fx", None)
    if decide is None:
        raise RuntimeError("lightning_paci needs Lightning's TrainingEpochLoop._should_check_val_fx (Lightning "
                           "2.5-2.7) to drain the pipeline before validation; install lightning<2.8")
    if getattr(decide, "drains_pipeline", False):
        return  # a later fit with the same Trainer

    def decide_and_drain(*args: Any, **kwargs: Any) -> bool:
        validate = decide(*args, **kwargs)
        if validate:
            drain()
        return validate

    decide_and_drain.drains_pipeline = True  # type: ignore[attr-defined]
    loop._should_check_val_fx = decide_and_drain


def _compares_monitor_now(callback: Callback, trainer: Trainer) -> bool:
    """Whether ``callback`` is a ModelCheckpoint about to compare its monitored metric after this batch;
    the same answer on every rank (it depends on the global step only)."""
    return (isinstance(callback, ModelCheckpoint) and callback.monitor is not None
            and callback._every_n_train_steps > 0 and trainer.global_step % callback._every_n_train_steps == 0
            and not callback._should_skip_saving_checkpoint(trainer))


def drop_prediction_writers(trainer: Trainer) -> None:
    """Stages before the last have no predictions (their predict_step stops at the stage boundary):
    prediction writers run on the last stage, global rank 0, with every prediction."""
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, BasePredictionWriter)]


class PipelineSync(Callback):
    """Runs first among callbacks: drains at the ends of epochs and of training, so that every later
    hook sees final weights, and makes the last stage's metrics visible on every stage."""

    def __init__(self, strategy: DrainPoints) -> None:
        self.strategy = strategy

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.strategy.sync_metrics()
            if trainer.state.fn == TrainerFn.FITTING:
                self.strategy.send_hook_logs()
                self.strategy.publish_telemetry()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.drain()  # Lightning steps on an epoch's last batch: that window closes here
        self.strategy.send_hook_logs()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning runs the module's on_train_epoch_end after the other callbacks' and before the
        # monitoring ones (EarlyStopping, ModelCheckpoint): copy the metrics right after it, so what
        # the module logs in that hook reaches them too.
        self.strategy.check_loader(trainer, trainer.train_dataloader)  # loaders of a datamodule exist now
        user_hook = pl_module.on_train_epoch_end

        def then_sync() -> None:
            user_hook()
            self.strategy.sync_metrics()
        pl_module.on_train_epoch_end = then_sync

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # Metrics logged in training_step exist on the last stage only. Only at the steps where a
        # ModelCheckpoint compares them, where it issues collectives itself and saves (a drain).
        if any(_compares_monitor_now(c, trainer) for c in trainer.checkpoint_callbacks):
            self.strategy.sync_metrics()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.strategy.drain()  # the callbacks' and the module's on_train_end run before the strategy's
        pl_module.__dict__.pop("on_train_epoch_end", None)  # on_train_start's wrapper



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
    """Hands the main process the whole trained model, the telemetry and the predictions, not rank 0's
    stage only."""

    @override
    def _wrapping_function(self, process_idx: int, trainer: Trainer | None, function: Callable,
                           *args: Any) -> None:
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
    def _recover_results_in_main_process(self, worker_output: _WorkerOutput, trainer: Trainer) -> None:
        module = trainer.lightning_module
        if worker_output.weights_path is not None:
            if is_overridden("configure_model", module):
                with torch.device("meta"):  # the layers the workers built (configure_model is idempotent)
                    module.configure_model()
            # meta: configure_model's layers or trainer.init_module(empty_init=True); take the trained
            # tensors as they are (Lightning's load copies into them)
            if has_meta_tensors(module):
                state = self._strategy.checkpoint_io.load_checkpoint(worker_output.weights_path)
                module.load_state_dict(state, strict=False, assign=True)
        super()._recover_results_in_main_process(worker_output, trainer)

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
