"""``PACIStrategy``: a Lightning strategy that trains an ordinary LightningModule as a pipeline.

One process per stage. Global rank 0 runs the *last* stage, so the loss, every ``self.log`` value,
the progress bar and the TensorBoard writer live on the process Lightning already logs from.
Stage ``i`` runs on global rank ``N - 1 - i``. With ``devices x num_nodes = N x R`` there are R
data-parallel replicas of the pipeline: stage ``i`` of replica ``r`` on rank ``r N + N - 1 - i``
(mesh.py), each window's gradients averaged over the stage's replicas (the plan's ``R``).

Per global batch Lightning calls ``training_step`` once; the strategy runs this stage's actions
for the batch (runtime.py) and ``optimizer_step`` only evaluates the closure, because each stage
steps its own optimizer where the plan says. Drains happen before validation/test, at checkpoints,
at epoch ends and at the end of fit (launch.py), before any user hook runs there.

This module holds the hooks into Lightning's loop. Placement, devices, process groups and
collectives are its base class's (processes.py); building a stage's view and runtime is
assemble.py's; every input check is checks.py's; checkpoint files are checkpoint.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_paci import checkpoint
from lightning_paci.advice import staleness_advice
from lightning_paci.assemble import build_runtime, split_model, stage_view
from lightning_paci.checks import (
    check_arguments,
    check_devices,
    check_last_batch,
    check_lr_schedulers,
    check_module,
    check_optimizer_count,
)
from lightning_paci.hollow import StageView
from lightning_paci.hooks import send_to_rank_zero
from lightning_paci.launch import (
    CheckedMultiprocessingLauncher,
    CheckedScriptLauncher,
    PipelineSync,
    drain_before_validation,
    drop_per_batch_sigterm_broadcast,
    drop_prediction_writers,
)
from lightning_paci.logs import share_callback_metrics
from lightning_paci.partition import Partition
from lightning_paci.processes import PipelineProcesses
from lightning_paci.runtime import StageRuntime, alias_parameters
from lightning_paci.schedules import STRATEGY_NAMES, PlanSpec, check_schedule
from lightning_paci.signals import PipelineSignals
from lightning_paci.telemetry import publish_telemetry


class PACIStrategy(PipelineProcesses):
    """Pipeline-parallel training with the PACI, 1F1B-flush or GPipe schedule; one process per stage.

    Args:
        schedule: ``"paci"`` (asynchronous, no flush, bounded drift), ``"1f1b"`` (1F1B-flush) or
            ``"gpipe"``; the strategy names ``"pipe_1f1b"``/``"pipe_gpipe"`` mean the same.
        micro_batches: micro-batches per global batch (the DataLoader's batch); the batch size must
            be divisible by it. Each stage steps where Lightning would: after the backwards of every
            ``accumulate_grad_batches``-th batch of an epoch and of its last batch.
        stages: number of stages; defaults to the number of devices. ``devices x num_nodes`` must be
            a multiple ``N x R``: R data-parallel replicas of the pipeline, each reading its own
            shard of the data (a DistributedSampler over the replicas), gradients averaged per window.
        split_points: names of the modules where stages 1..N-1 begin, in execution order (see
            ``lightning_paci.partition``); default: an automatic split.
        partition: automatic split balanced by ``"parameters"`` (default) or ``"uniform"`` over blocks.
        max_drift: fail at setup if the schedule's drift bound ``ceil((N-1)/a)`` exceeds it.
        start_method: ``"popen"`` re-runs the script per rank (like ``ddp``); ``"spawn"``/``"fork"``/
            ``"forkserver"`` start workers with multiprocessing (no re-execution, needs picklable
            objects; use it under Hydra multirun). Ignored under torchrun/SLURM.
        timeout_s: every wait on another stage gives up after this many seconds.
        num_threads: torch threads per stage process on CPU; default: cores / local stages.
        record_timeline: keep a per-action timeline (``stage_timeline``) for traces and Gantt charts.
        skip_nonfinite_windows: skip the optimizer step of a window (its micro-batches' accumulated
            gradients, dropped) whose loss or gradients are non-finite, without any collective: the flag
            rides upstream with the gradients, so a non-finite loss skips the window on every stage, and
            non-finite gradients on stage i alone skip it on stages 0..i while later stages step it.
            Step counts and LR schedulers advance as when AMP's GradScaler skips a step; telemetry counts
            ``skipped_windows`` per stage (lightning_paci/nonfinite.py).
        process_group_backend: override ``gloo`` (CPU) / ``nccl`` (CUDA).

    After setup, ``stage_split`` is the split itself (a ``partition.Partition``: units per stage), which
    ``partition`` (the mode) and ``split_points`` chose.
    """

    strategy_name = "paci"

    def __init__(
        self,
        schedule: Literal["paci", "1f1b", "gpipe", "pipe_1f1b", "pipe_gpipe"] = "paci",
        micro_batches: int = 4,
        stages: int | None = None,
        split_points: list[str] | None = None,
        partition: Literal["parameters", "uniform"] = "parameters",
        max_drift: int | None = None,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        timeout_s: float = 600.0,
        num_threads: int | None = None,
        record_timeline: bool = False,
        skip_nonfinite_windows: bool = False,
        process_group_backend: str | None = None,
        accelerator: Any = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: Any = None,
        checkpoint_io: Any = None,
        precision_plugin: Any = None,
    ) -> None:
        super().__init__(stages, timeout_s, num_threads, process_group_backend, accelerator=accelerator,
                         parallel_devices=parallel_devices, cluster_environment=cluster_environment,
                         checkpoint_io=checkpoint_io, precision_plugin=precision_plugin)
        schedule = check_schedule(schedule)
        check_arguments(micro_batches, stages, partition, max_drift, start_method)
        self.schedule, self.micro_batches = schedule, micro_batches
        self.split_points = list(split_points) if split_points is not None else None
        self.partition, self.max_drift = partition, max_drift
        self._start_method, self._record_timeline = start_method, record_timeline
        self.skip_nonfinite_windows = skip_nonfinite_windows
        self._aliases: list[tuple[nn.Parameter, nn.Parameter]] = []
        self._schedulers: list[Any] = []
        self._view: StageView | None = None
        self._signals: PipelineSignals | None = None
        self.stage_split: Partition | None = None  # the split itself; `partition` is its mode
        self.runtime: StageRuntime | None = None
        self._closes_window = False  # set while Lightning's optimizer_step runs this batch
        self.telemetry: list[dict[str, Any]] | None = None
        self.stage_timeline: list | None = None

    @property
    def accumulation(self) -> int:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        return self.micro_batches * (trainer.accumulate_grad_batches if trainer is not None else 1)

    # -- before any process starts -----------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = CheckedScriptLauncher(self.cluster_environment, self.num_processes, self.num_nodes)
        else:
            self._launcher = CheckedMultiprocessingLauncher(self, start_method=self._start_method)
        self._launcher.check = self._check_before_launch

    def _check_before_launch(self, trainer: Trainer, args: tuple = ()) -> None:
        """Every mistake that can be seen from the main process fails here, before ranks start."""
        check_devices(self.stages, self.num_processes * self.num_nodes, self.shares_device,
                      self._process_group_backend)
        checkpoint.recover_checkpoint_dirs(trainer)  # an overwrite cut short by a kill: back before "last"
        module = trainer.lightning_module
        if module is None:
            return
        self._check_module(module, trainer)
        if is_overridden("configure_model", module) and not any(True for _ in module.parameters()):
            return  # the layers come in configure_model, inside each stage process: split them there
        self.stage_split = split_model(module, self.n_stages, self.split_points, self.partition, self.schedule)
        if trainer.state.fn == TrainerFn.FITTING and len(args) > 1:
            self.check_loader(trainer, args[1])  # fit(model, train_dataloaders, ...)

    def check_loader(self, trainer: Trainer, loader: Any) -> None:
        check_last_batch(loader, self.micro_batches, trainer.max_steps, trainer.accumulate_grad_batches,
                         trainer.limit_train_batches)

    def _check_module(self, module: LightningModule, trainer: Trainer) -> None:
        check_module(module, trainer, self.precision_plugin, self.schedule, self.n_stages, self.micro_batches,
                     self.max_drift)

    # -- inside each process -----------------------------------------------------------------------------
    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        if self.world_size % self.n_stages:
            raise ValueError(f"{self.n_stages} stages need {self.n_stages} x R processes, found world size "
                             f"{self.world_size}")
        self._check_module(module, trainer)
        self.stage_split = split_model(module, self.n_stages, self.split_points, self.partition, self.schedule)
        if self.global_rank == 0:
            replicas = f", {self.layout.replicas} data-parallel replicas" if self.layout.replicas > 1 else ""
            print(f"lightning_paci: {self.schedule} over {self.n_stages} stages{replicas}, "
                  f"{self.micro_batches} micro-batches per batch\n{self.stage_split.table()}", flush=True)
        self.model = self.precision_plugin.convert_module(module)
        self._view = stage_view(module, self.stage_split, self.stage, self.root_device, self._view)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        self._build_runtime(trainer)
        if not any(isinstance(c, PipelineSync) for c in trainer.callbacks):
            trainer.callbacks.insert(0, PipelineSync(self))
        self._signals = PipelineSignals(trainer, self)  # before Lightning registers its signal handlers
        drop_per_batch_sigterm_broadcast(trainer, self._signals)
        drain_before_validation(trainer, self.drain)
        if trainer.state.fn == TrainerFn.PREDICTING and self.stage != self.n_stages - 1:
            drop_prediction_writers(trainer)

    @override
    def setup_optimizers(self, trainer: Trainer) -> None:
        try:
            super().setup_optimizers(trainer)
        except Exception as error:  # Lightning refuses several optimizers and suggests manual optimization
            if "multiple optimizers" not in str(error):
                raise
            check_optimizer_count("several")
        check_optimizer_count(len(self.optimizers))
        check_lr_schedulers(self.lr_scheduler_configs)
        advice = staleness_advice(check_schedule(self.schedule), self.optimizers[0], self.n_stages,
                                  self.micro_batches, trainer.accumulate_grad_batches)
        if advice:  # after the schedulers are built: their initial_lr is the peak (advice.py)
            rank_zero_warn(advice)
        # Each stage steps its own schedulers where the plan says; Lightning must not step them too.
        self._schedulers, self.lr_scheduler_configs = self.lr_scheduler_configs, []
        self._aliases = alias_parameters(self.optimizers[0])

    def _build_runtime(self, trainer: Trainer) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        spec = PlanSpec(self.schedule, self.n_stages, self.micro_batches, self.accumulation, self.layout.replicas)
        seed = self.broadcast(torch.initial_seed() % 2**63)  # one seed for the stages' shared randomness
        self.runtime = build_runtime(
            self.lightning_module, self._view, self.stage_split, spec, self.stage_link(), layout=self.layout,
            groups=self._groups, timeout=self._timeout, fitting=fitting,
            optimizer=self.optimizers[0] if fitting else None, aliases=self._aliases, schedulers=self._schedulers,
            precision_plugin=self.precision_plugin, log_every_n_steps=trainer.log_every_n_steps,
            record_timeline=self._record_timeline, skip_nonfinite_windows=self.skip_nonfinite_windows,
            seed=seed, previous=self.runtime)

    # -- the training loop -------------------------------------------------------------------------------
    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.runtime is not None
        batch, batch_idx = args[0], args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
        with self.precision_plugin.train_step_context():
            return self.runtime.train_batch(batch, batch_idx, closes_window=self._closes_window)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self.runtime.eval_batch("validation_step", *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self.runtime.eval_batch("test_step", *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.runtime is not None
        with self.precision_plugin.predict_step_context():
            return self.runtime.predict_batch(*args, **kwargs)

    @override
    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        return closure_loss  # the runtime already ran every backward of the batch

    @override
    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        # Lightning calls this on the batches that end its accumulation windows (every
        # accumulate_grad_batches-th of an epoch, and the epoch's last), and runs training_step
        # inside the closure: each stage steps after that batch's last backward (the plan's S), so
        # its version follows global_step.
        self._closes_window = True
        try:
            return closure()
        finally:
            self._closes_window = False

    @override
    def on_validation_start(self) -> None:
        self.drain()

    @override
    def on_test_start(self) -> None:
        self.drain()

    @override
    def on_predict_start(self) -> None:
        self.drain()

    @override
    def on_train_end(self) -> None:
        self.drain()
        self.send_hook_logs()
        self.publish_telemetry()
        if self._signals is not None:
            self._signals.at_train_end()

    def drain(self) -> None:
        if self.runtime is not None:
            self.runtime.drain()

    def send_hook_logs(self) -> None:
        """Values logged in backward/step hooks off rank 0 reach its loggers (hooks.py; a collective)."""
        if self.runtime is not None:
            send_to_rank_zero(self.runtime.hooks, self.stage, self.n_stages - 1,
                              self.lightning_module.trainer.loggers)

    def publish_telemetry(self) -> None:
        """Every stage's telemetry on rank 0 (a drain point: no bubble to cost), logged there."""
        assert self.runtime is not None
        own = self.runtime.telemetry()
        if self.layout.replicas > 1:
            own["replica"] = self.replica
        self.telemetry = publish_telemetry(own, self.global_rank, self.world_size,
                                           self.lightning_module.trainer)
        self.stage_timeline = self.runtime.timeline if self.global_rank == 0 else None

    def sync_metrics(self) -> None:
        """Copy the last stage's callback metrics to every stage (for ModelCheckpoint/EarlyStopping)."""
        share_callback_metrics(self.lightning_module.trainer, self.global_rank, self.broadcast)

    # -- state ---------------------------------------------------------------------------------------------
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the stage split and the optimizer must exist to load a stage's share

    @property
    @override
    def lightning_restore_optimizer(self) -> bool:
        return False  # load_checkpoint restores this stage's optimizer and schedulers itself

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        names = checkpoint.parameter_names(self.lightning_module, self._aliases)
        return checkpoint.optimizer_state_by_name(optimizer, names)

    @override
    def save_checkpoint(self, checkpoint_dict: dict[str, Any], filepath: Any,
                        storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("PACIStrategy writes checkpoints with torch.distributed.checkpoint; "
                            "storage_options are not supported")
        version = self.runtime.version if self.runtime is not None else 0
        layout = checkpoint.layout_of(self.stage_split, self.schedule)
        checkpoint.save_stage(Path(self.broadcast(str(filepath))), self.stage, self.global_rank, checkpoint_dict,
                              layout, self._schedulers, version, self.barrier, self.replica)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        names = checkpoint.parameter_names(self.lightning_module, self._aliases)
        layout = checkpoint.layout_of(self.stage_split, self.schedule)
        meta, version = checkpoint.load_stage(
            Path(self.broadcast(str(checkpoint_path))), self.stage, layout, self.lightning_module,
            self.optimizers[0] if self.optimizers else None, names, self._schedulers, weights_only)
        if self.runtime is not None:
            self.runtime.version = version
        return meta

    @override
    def load_model_state_dict(self, checkpoint_dict: Any, strict: bool = True) -> None:
        pass  # load_checkpoint already loaded this stage's tensors

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """This stage's own tensors under the user's names; the stages' dicts together are the model."""
        self.drain()
        assert self.lightning_module is not None
        return {k: v for k, v in self.lightning_module.state_dict().items() if not v.is_meta}

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The whole model (every stage's tensors, on CPU) on global rank 0; None elsewhere.

        A collective: call it on every rank, after fit. Loading it into a fresh instance of the
        LightningModule gives the trained model as one ordinary module.
        """
        own = self.lightning_module_state_dict() if self.replica == 0 else {}  # replicas hold copies
        return checkpoint.gather_full_state_dict(own, self.global_rank, self.world_size)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for schedule, name in STRATEGY_NAMES.items():
            strategy_registry.register(name, cls, description=f"pipeline parallel, {schedule} schedule",
                                       override=True, schedule=schedule)


# ``import lightning_paci`` brings this module in (see _registration.py): Trainer(strategy="paci") works.
PACIStrategy.register_strategies(StrategyRegistry)
