"""A pipeline training run the tests launch as a script (Lightning's popen launcher re-runs it per rank).

    python tests/pipeline_script.py --schedule paci --stages 2 --steps 6 --out /tmp/run

Each stage writes ``stage{i}.pt`` (its own parameters under the user's names) and rank 0 writes
``telemetry.json``. ``--fail-unit NAME --fail-step K`` makes that module raise at global step K.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lightning_paci import PACIStrategy  # noqa: E402
from tests.models import LitMeta, LitTiny, RandomMasking, TwoOptimizers, loader  # noqa: E402


class _CollectiveCounter(L.Callback):
    """Wraps torch.distributed's collectives and counts the calls made while training batches run:
    from a batch's start to the next one's (the loop's own code between batches included), leaving
    out validation, checkpoints and the end of the epoch (drain points)."""

    NAMES = ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object", "gather_object",
             "broadcast_object_list", "reduce", "scatter", "all_to_all")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.calls: dict[str, int] = {}
        self.inside = False
        for name in self.NAMES:
            original = getattr(dist, name)

            def counted(*a, _name=name, _original=original, **k):
                key = _name if self.inside else "outside batches"
                self.calls[key] = self.calls.get(key, 0) + 1
                return _original(*a, **k)
            setattr(dist, name, counted)

    def on_train_batch_start(self, *args) -> None:
        self.inside = True

    def on_validation_start(self, *args) -> None:
        self.inside = False

    def on_train_epoch_end(self, *args) -> None:
        self.inside = False


class _BatchRecorder(L.Callback):
    """Records what each rank trains on: one fingerprint (sum of the token ids) per batch."""

    def __init__(self) -> None:
        self.sums: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.sums.append(int(batch[0].sum()))


class _LaggingClock:
    """Like CUDA events: a mark is read back only once complete, and the newest marks never are yet
    (a stream running behind the host); reading an incomplete mark fails the run."""

    LAG = 3

    def __init__(self) -> None:
        import time

        self.now, self.count = time.perf_counter, 0

    def mark(self) -> list:
        self.count += 1
        return [self.now(), self.count]

    def ready(self, mark: list) -> bool:
        return mark[1] <= self.count - self.LAG

    def seconds(self, mark: list) -> float:
        self.count += self.LAG  # a blocking read: the stream catches up
        return mark[0]


class _WeightsAtHooks(L.Callback):
    """Records this stage's own parameters at the hooks a user saves or inspects a model in (and rank 0's
    val_loss after each validation): what a user's callback sees there."""

    HOOKS = ("on_validation_start", "on_train_epoch_end", "on_train_end", "on_fit_end")

    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []
        for hook in self.HOOKS:
            setattr(self, hook, lambda trainer, module, _hook=hook: self._record(_hook, module))

    def _record(self, hook: str, module) -> None:
        own = {k: v.detach().clone() for k, v in module.state_dict().items() if not v.is_meta}
        self.seen.append((hook, own))

    def on_validation_end(self, trainer, module) -> None:
        if trainer.global_rank == 0 and not trainer.sanity_checking:
            self.seen.append(("val_loss", float(trainer.callback_metrics["val_loss"])))


def _kill_at_swap(n: int) -> None:
    """The process that renames a finished ``last.ckpt.tmp`` into place dies there, the n-th time."""
    import signal

    rename, count = Path.rename, [0]

    def renaming(self, target):
        if self.name == "last.ckpt.tmp" and Path(target).name == "last.ckpt":
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return rename(self, target)
    Path.rename = renaming


class _Running(L.Callback):
    """Writes ``pid_rank<r>`` once training runs, so a test knows whom to signal, and when."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, *args) -> None:
        path = self.out / f"pid_rank{trainer.global_rank}"
        if not path.exists():
            path.write_text(str(os.getpid()))


class _ProgramTrace(L.Callback):
    """Every action and message operation this stage executed (runtime.record_trace), written to
    ``trace_stage<i>.json`` when the fit ends, after the last drain."""

    def __init__(self, out: Path) -> None:
        self.out, self.trace = out, None

    def on_train_start(self, trainer, module) -> None:
        self.trace = trainer.strategy.runtime.record_trace()

    def on_fit_end(self, trainer, module) -> None:
        stage = trainer.strategy.stage
        (self.out / f"trace_stage{stage}.json").write_text(json.dumps([str(op) for op in self.trace]))


class _InfGradient(L.Callback):
    """The first parameter of ``unit`` gets an infinite gradient at the ``at``-th backward through it
    (counted from 0), on the stage that owns it: non-finite local gradients on one stage only."""

    def __init__(self, unit: str, at: int) -> None:
        self.unit, self.at, self.count = unit, at, 0

    def on_train_start(self, trainer, module) -> None:
        param = next(module.get_submodule(self.unit).parameters())
        if not param.is_meta:
            param.register_hook(self._hook)

    def _hook(self, grad: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return torch.full_like(grad, float("inf")) if self.count - 1 == self.at else grad


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedule", default="paci")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1, help="Trainer(num_nodes=...), under torchrun")
    parser.add_argument("--replicas", type=int, default=1, help="data-parallel replicas (x stages devices)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--batch-format", default="tuple")
    parser.add_argument("--sched", action="store_true")
    parser.add_argument("--val-every", type=int, default=0)
    parser.add_argument("--val-total", action="store_true",
                        help="count --val-every over all batches, across epochs (check_val_every_n_epoch=None)")
    parser.add_argument("--record-hooks", action="store_true",
                        help="write each rank's parameters as seen at validation, epoch, train and fit ends")
    parser.add_argument("--logger", action="store_true")
    parser.add_argument("--fail-unit", default=None)
    parser.add_argument("--fail-step", type=int, default=0)
    parser.add_argument("--nan-step", type=int, default=-1, help="the logits turn NaN at this global step")
    parser.add_argument("--inf-grad-unit", default=None, help="this unit's gradient turns inf (see --inf-grad-at)")
    parser.add_argument("--inf-grad-at", type=int, default=0, help="at the unit's n-th backward (from 0)")
    parser.add_argument("--skip-nonfinite", action="store_true", help="PACIStrategy(skip_nonfinite_windows=True)")
    parser.add_argument("--trace", action="store_true", help="write each stage's executed program")
    parser.add_argument("--hang", action="store_true", help="--fail-unit sleeps an hour instead of raising")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--start-method", default="popen")
    parser.add_argument("--by-name", action="store_true", help='strategy="paci" etc. from the registry')
    parser.add_argument("--epoch-batches", type=int, default=0, help="batches per epoch (default: all steps)")
    parser.add_argument("--ckpt-dir", default=None, help="ModelCheckpoint at every epoch end")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--save-last", action="store_true", help="ModelCheckpoint(save_last=True)")
    parser.add_argument("--save-hparams", action="store_true", help="checkpoints hold the model's init arguments")
    parser.add_argument("--kill-at-swap", type=int, default=0,
                        help="SIGKILL rank 0 as it renames the N-th saved last.ckpt into place")
    parser.add_argument("--two-optimizers", action="store_true")
    parser.add_argument("--validate", action="store_true", help="trainer.validate() after fit")
    parser.add_argument("--shuffle", action="store_true", help="shuffle=True in the training DataLoader")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--masking", action="store_true",
                        help="RandomMasking model; each rank writes the random numbers it drew per micro-batch")
    parser.add_argument("--unseeded-shuffle", action="store_true",
                        help="shuffle=True, use_distributed_sampler=False, no seed: stages read different batches")
    parser.add_argument("--record-batches", action="store_true", help="write each rank's batch sums")
    parser.add_argument("--count-collectives", action="store_true",
                        help="count torch.distributed collectives issued inside training batches")
    parser.add_argument("--slow-ms", type=float, default=0.0,
                        help="every block sleeps this long per real forward (signals then land mid-action)")
    parser.add_argument("--root-dir", default=None, help="Trainer(default_root_dir=...)")
    parser.add_argument("--pid-files", action="store_true", help="write pid_rank<r> once training runs")
    parser.add_argument("--nccl-order", action="store_true",
                        help="run isend/irecv under NCCL's ordering rules (tests/nccl_order.py)")
    parser.add_argument("--shared-group", action="store_true",
                        help="both directions on the default group, as fedc153 did (to show it hangs on NCCL)")
    parser.add_argument("--host-headers", action="store_true",
                        help="activation headers on a group of their own, as with NCCL (p2p.boundary_groups)")
    parser.add_argument("--extras", action="store_true",
                        help="a grad-free mask and non-contiguous activations cross the boundaries")
    parser.add_argument("--lagging-clock", action="store_true",
                        help="clock marks that complete late, as CUDA events do (lightning_paci/clock.py)")
    parser.add_argument("--shared-device", action="store_true",
                        help="Trainer(devices=1), PACIStrategy(stages=N): every stage process on one device")
    parser.add_argument("--accelerator", default="cpu", help="cpu, or cuda for tests/test_gpu.py")
    parser.add_argument("--meta-init", action="store_true", help="the model's layers come in configure_model")
    parser.add_argument("--init-module", action="store_true",
                        help="build the model under trainer.init_module(empty_init=True) (on the meta device)")
    parser.add_argument("--hf", default=None, help="a tiny Hugging Face model instead (tests/models_hf.py KINDS)")
    parser.add_argument("--tied", action="store_true", help="nanoGPT's tying: wte.weight = lm_head.weight")
    parser.add_argument("--split-points", default=None, help="comma-separated PACIStrategy(split_points=...)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    if args.nccl_order:
        from tests import nccl_order

        nccl_order.install(timeout_s=args.timeout)
    if args.kill_at_swap:
        _kill_at_swap(args.kill_at_swap)
    if args.shared_group:
        import lightning_paci.mesh

        lightning_paci.mesh.boundary_groups = lambda ranks, timeout=None, **_: None
    if args.host_headers:
        import lightning_paci.mesh
        from lightning_paci.p2p import boundary_groups

        lightning_paci.mesh.boundary_groups = lambda ranks, timeout=None, **_: boundary_groups(
            ranks, timeout, host_headers=True)
    if args.lagging_clock:
        import lightning_paci.runtime
        import lightning_paci.telemetry

        lightning_paci.runtime.clock_for = lambda device: _LaggingClock()
        lightning_paci.telemetry.SETTLE_EVERY = 4  # settle often, while the newest marks are incomplete
    if not args.unseeded_shuffle:
        L.seed_everything(0, verbose=False)
    module_class = (TwoOptimizers if args.two_optimizers else LitMeta if args.meta_init
                    else RandomMasking if args.masking else LitTiny)
    if args.hf:
        from tests.models_hf import LitHF

        model = LitHF(args.hf, dtype=getattr(torch, args.dtype), sched=args.sched)
    else:
        model = module_class(n_layers=args.layers, dtype=getattr(torch, args.dtype),
                             batch_format=args.batch_format, sched=args.sched, dropout=args.dropout,
                             **({"extras": True} if args.extras else {}))
    if args.tied:
        model.model.transformer.wte.weight = model.model.lm_head.weight
    if args.save_hparams:
        model.save_hyperparameters({"n_layers": args.layers, "dtype": getattr(torch, args.dtype),
                                    "batch_format": args.batch_format, "sched": args.sched,
                                    "dropout": args.dropout})
    if args.fail_unit:
        def fail(module, inputs):
            if not inputs[0].is_meta and model.trainer.global_step == args.fail_step:
                if args.hang:
                    time.sleep(3600)
                raise RuntimeError(f"injected failure in {args.fail_unit}")
        model.get_submodule(args.fail_unit).register_forward_pre_hook(fail)
    if args.nan_step >= 0:
        def nan(module, inputs, output):
            if not output.is_meta and model.trainer.global_step == args.nan_step:
                return output * float("nan")
        model.model.lm_head.register_forward_hook(nan)
    if args.slow_ms:
        def slow(module, inputs):
            if not inputs[0].is_meta:
                time.sleep(args.slow_ms / 1000)
        for block in model.model.transformer.h:
            block.register_forward_pre_hook(slow)
    if args.by_name:
        import lightning_paci  # noqa: F401  (registers "paci", "pipe_1f1b", "pipe_gpipe")
        strategy = {"paci": "paci", "1f1b": "pipe_1f1b", "gpipe": "pipe_gpipe"}[args.schedule]
    else:
        strategy = PACIStrategy(schedule=args.schedule, micro_batches=args.micro_batches,
                                timeout_s=args.timeout, start_method=args.start_method,
                                stages=args.stages if args.shared_device or args.replicas > 1 else None,
                                split_points=args.split_points.split(",") if args.split_points else None,
                                skip_nonfinite_windows=args.skip_nonfinite)
    callbacks = []
    if args.ckpt_dir:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(args.ckpt_dir, save_top_k=-1, every_n_epochs=1,
                                                             filename="{epoch}-{step}", save_last=args.save_last))
    if args.count_collectives:
        callbacks.append(_CollectiveCounter())
    if args.record_batches:
        callbacks.append(_BatchRecorder())
    if args.record_hooks:
        callbacks.append(_WeightsAtHooks())
    if args.pid_files:
        callbacks.append(_Running(out))
    if args.trace:
        callbacks.append(_ProgramTrace(out))
    if args.inf_grad_unit:
        callbacks.append(_InfGradient(args.inf_grad_unit, args.inf_grad_at))
    devices = 1 if args.shared_device else args.stages * args.replicas // args.num_nodes
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes, strategy=strategy,
        max_steps=args.steps, callbacks=callbacks, default_root_dir=args.root_dir,
        accumulate_grad_batches=args.accumulate, enable_checkpointing=bool(args.ckpt_dir),
        enable_progress_bar=False, max_epochs=-1,
        # As with DDP, Lightning's sampler shuffles training data; the references read it in order.
        # Replicas read shards through it (in order here: replica r reads samples r, r+R, ...).
        use_distributed_sampler=(args.shuffle and not args.unseeded_shuffle) or args.replicas > 1,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
        logger=TensorBoardLogger(out, name="tb") if args.logger else False,
        val_check_interval=args.val_every or None, limit_val_batches=2 if args.val_every else 0,
        check_val_every_n_epoch=None if args.val_total else 1)
    if args.init_module:  # built again, now on the meta device: each stage materializes its own units
        with trainer.init_module(empty_init=True):
            model = module_class(n_layers=args.layers, dtype=getattr(torch, args.dtype))
        assert all(p.is_meta for p in model.parameters())
    n_batches = args.epoch_batches or args.steps * args.accumulate
    train = loader(args.batch_size, n=args.batch_size * n_batches * args.replicas, batch_format=args.batch_format,
                   shuffle=args.shuffle or args.unseeded_shuffle)
    val = loader(args.batch_size, n=2 * args.batch_size, seed=1, batch_format=args.batch_format)
    trainer.fit(model, train, val if args.val_every else None, ckpt_path=args.resume)
    strategy = trainer.strategy
    validated = trainer.validate(model, val, verbose=False)[0] if args.validate else None
    for callback in callbacks:
        if isinstance(callback, _CollectiveCounter):
            (out / f"collectives_rank{trainer.global_rank}.json").write_text(json.dumps(callback.calls))
        if isinstance(callback, _BatchRecorder):
            (out / f"batches_rank{trainer.global_rank}.json").write_text(json.dumps(callback.sums))
        if isinstance(callback, _WeightsAtHooks):
            torch.save(callback.seen, out / f"hooks_rank{trainer.global_rank}.pt")
    if args.masking:
        (out / f"draws_rank{trainer.global_rank}.json").write_text(json.dumps(model.draws))
    if args.start_method != "popen":  # the main process holds the whole trained model
        torch.save(model.state_dict(), out / "model.pt")
        stage = "all"
    else:
        stage = strategy.stage
        own = {k: v.cpu() for k, v in strategy.lightning_module_state_dict().items()}
        replica = strategy.replica
        torch.save(own, out / (f"stage{stage}.pt" if replica == 0 else f"replica{replica}_stage{stage}.pt"))
    if trainer.global_rank == 0:
        # After forked workers Lightning restores trainer.state, not loop progress, in the main process.
        global_step = trainer.global_step if args.start_method == "popen" else None
        result = {"global_step": global_step, "state": trainer.state.status.value, "telemetry": strategy.telemetry,
                  "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}, "validated": validated}
        (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"rank {trainer.global_rank} (stage {stage}, pid {os.getpid()}) done", flush=True)


if __name__ == "__main__":
    main()
