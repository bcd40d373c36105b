"""Throughput, utilization and memory of PACI against 1F1B-flush, GPipe, torch's pipelining and one process.

    python recipes/benchmark.py                          # 2 stages, m=4, 3 rounds: about 12 min on 2 cores
    python recipes/benchmark.py --n-embd 256 --n-head 4  # a 4x smaller model: tens of ms per action
    python recipes/benchmark.py --rounds 5 --steps 30    # every setting: --help
    python -m lightning_paci.simulate --costs runs/benchmark/costs.json --micro-batches 4
    python -m recipes.benchmark_report runs/benchmark/benchmark.json   # summarize a stored run again

One invocation, one set of processes: ``torch.multiprocessing`` starts one process per stage, each
joins one gloo group once and then runs, round after round in an order that rotates, on the same
GPT (same initialisation), the same stage split, the same batches and one thread per process:

- ``peer_gpipe``, ``peer_1f1b``: ``torch.distributed.pipelining`` ScheduleGPipe / Schedule1F1B on
  stage modules made of the partition's units (``nn.Sequential``), stage i on rank N-1-i as ours;
- ``pipe_gpipe``, ``pipe_1f1b``, ``paci``: ``Trainer.fit`` with ``PACIStrategy``;
- ``single_1thread``, ``single_allcores``: ``Trainer.fit`` of the whole model on one device in
  rank 0's process, with one thread and with every core, while the other ranks wait.

Measures (run = one schedule in one round of K steps; steps 1..w are warm-up and K-c+1..K the end of
the run, neither timed: in the last step PACI's first stage has no next batch to start and idles
while the last stage finishes, an edge a long run does not have):
- tokens/s: tokens of steps w+1..K-c over the time from the end of step w to the end of step K-c on
  the last stage (rank 0); per schedule the median over rounds, the min and max show the spread;
- ratios: per round against the pipe_1f1b and peer_1f1b runs of the same round, median over rounds;
  also at equal compute speed: times the two runs' compute per batch (the sum over stages of mean
  action times; the same work, so it differs only by the machine's speed in each run);
- utilization: per stage, compute time inside that window / its length (timelines of every
  action; waits for a neighbour are split off as "recv"/"send"); bubble = 1 - utilization;
  ``*_run`` values are the runtime's own telemetry over the whole fit, warm-up and drain included;
- ceilings, per stage: ``balance_ceiling`` (its mean compute per batch over the busiest stage's)
  and ``replay_utilization`` (the plan re-timed with every action's measured duration and nothing
  between actions, ``lightning_paci.simulate.replay``: what the run's own compute, jitter
  included, allows); ``overhead_fraction``: the share of the window that replay does not need
  (trainer loop, runtime, messages on the critical path), for the peer's runs too;
- peak memory: glibc heap in use sampled after every action (lightning_paci.memory.PeakMemory),
  the same meter for ours, the peer's (after each forward/backward/loss/step) and single runs;
  ``peak_memory_bytes`` is the process's heap, ``run_memory_bytes`` that minus the heap in use
  just before the run (the run's model, gradients, optimizer state and activations): the goal
  compares the latter, which the process's ~150 MiB of libraries would otherwise dilute;
- max drift: optimizer steps between a micro-batch's forward and its backward (ours only);
- last loss: the last step's training loss, the same for every synchronous run (same work);
- machine noise: before each run rank 0 waits (``--quiet-wait-s``) until other processes leave the
  CPU idle, and every run records the share of CPU time they took meanwhile (``foreign_cpu``);
  each round starts by timing a micro-batch forward+backward on each process alone, then on all
  at once (``machine.concurrency``): whether the cores really run the stages in parallel, and how
  much the time of that same work varies from one repeat to the next (``alone_cv``, ``together_cv``),
  and how much longer the slowest process took than the fastest while all ran it at once
  (``rank_spread``: the cores' speeds differ, so the stage on the faster one waits).

``--lightning-sigterm-broadcast`` puts back, in our runs, the broadcast of rank 0's SIGTERM flag
that Lightning 2.6 makes before every training batch and that PACIStrategy replaces by a local
check: a collective that makes every stage wait for the others once per batch (BENCHMARKS.md
measures what it costs).

Writes ``<out>/benchmark.json`` (every number), ``<out>/costs*.json`` (per-stage F/B/S means of
ours in the steady window, the simulator's input), ``<out>/gantt.png`` and ``<out>/trace.json``
(two steady batches, resp. the whole last round, measured next to the simulator fed those costs).
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import resource
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `recipes` and `lightning_paci` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_paci import PACIStrategy
from lightning_paci.memory import PeakMemory
from lightning_paci.partition import partition_model
from lightning_paci.schedules import PlanSpec
from lightning_paci.timeline import TimelineEvent
from recipes.benchmark_config import Config, parse
from recipes.benchmark_report import (
    OURS,
    PEERS,
    PIPELINES,
    SINGLES,
    replay_ceiling,
    report,
    time_budget,
    timed_steps,
)
from recipes.data import StdlibCorpus
from recipes.gpt import GPT

_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")


# -- one process per stage ---------------------------------------------------------------------------
class StepClock(L.Callback):
    """perf_counter at the end of every training step (rank 0's is the last stage's); samples
    ``memory`` there too when given."""

    def __init__(self, memory: PeakMemory | None = None) -> None:
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.memory = memory

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.ends.append(time.perf_counter())
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss) if loss is not None else float("nan"))
        if self.memory is not None:
            self.memory.sample()


class _LightningSigtermBroadcast(L.Callback):
    """Drops the strategy's per-instance replacement of the loop's per-batch SIGTERM broadcast, so
    Lightning's own (a collective before every batch) runs again: the before/after comparison."""

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)


class Bench:
    """What one process runs; ``rank`` holds stage N-1-rank in every pipelined run."""

    def __init__(self, cfg: Config, rank: int) -> None:
        self.cfg, self.rank, self.stage = cfg, rank, cfg.stages - 1 - rank
        self.env = {k: os.environ[k] for k in _DIST_ENV}
        self.data = StdlibCorpus(max_bytes=cfg.max_bytes, block_size=cfg.block_size, batch_size=cfg.batch_size,
                                 val_batches=1, cache_dir=cfg.cache_dir, seed=cfg.seed)
        self.data.setup("fit")
        self.stage_split = partition_model(self.model(), cfg.stages)

    def model(self) -> GPT:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights in every run
        return GPT(vocab_size=self.data.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                   n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=0.0, max_steps=cfg.steps)

    def run(self, name: str) -> dict[str, Any]:
        """One pipelined run on every rank; returns rank 0's result (other ranks: None)."""
        gc.collect()
        dist.barrier()
        before = PeakMemory(torch.device("cpu")).in_use()
        ends, losses, stage_stats, events = (self._peer if name in PEERS else self._ours)(name)
        stage_stats["run_memory_bytes"] = stage_stats["peak_memory_bytes"] - before
        gathered: list[Any] = [None] * self.cfg.stages
        dist.all_gather_object(gathered, (self.stage, stage_stats, events))
        if self.rank != 0:
            return {}
        stats = [s for _, s, _ in sorted(gathered, key=lambda g: g[0])]
        timeline = [e for _, _, evs in gathered for e in evs]
        window = self._window(ends)
        schedule = OURS.get(name) or PEERS[name]  # the peer runs the same action order as our plan
        ceiling = replay_ceiling(self.cfg, schedule, timeline if name in OURS else _loss_into_forward(timeline))
        spec = PlanSpec(schedule, self.cfg.stages, self.cfg.micro_batches, self.cfg.micro_batches)
        for s in stats:
            mine = [e for e in timeline if e.stage == s["stage"]]
            # ours: the first action of every batch, where the trainer's loop ends (the peer has no such split)
            starts = {str(spec.batch(s["stage"], k)[0]) for k in range(self.cfg.steps)} if name in OURS else set()
            budget = time_budget(mine, starts, window)
            s["utilization"] = budget["compute"]
            s["bubble_fraction"] = 1.0 - s["utilization"]
            s.update(_mean_costs(mine, window))
            s["replay_utilization"] = ceiling["utilization"][s["stage"]]
            s["overhead_fraction"] = 1.0 - ceiling["length"] / (window[1] - window[0])
            if name in OURS:  # idle time split into waits, the runtime's bookkeeping, the trainer's loop
                s.update({f"{k}_fraction": v for k, v in budget.items()})
        return {"name": name, "tokens_per_s": self._rate(ends), **_losses(losses), "stages": stats,
                "timeline": timeline}

    def _window(self, ends: list[float]) -> tuple[float, float]:
        """From the end of step w to the end of step K-c (rank 0's clock): the timed steps."""
        first, last = timed_steps(self.cfg)
        return ends[first], ends[last]

    def _rate(self, ends: list[float]) -> float:
        cfg = self.cfg
        start, end = self._window(ends)
        timed = cfg.steps - cfg.warmup_steps - cfg.cooldown_steps
        return timed * cfg.batch_size * cfg.block_size / (end - start)

    def _trainer(self, strategy: Any, devices: int, clock: StepClock) -> L.Trainer:
        # use_distributed_sampler=False: Lightning would reshuffle training batches with a
        # DistributedSampler; every run here must train on the loader's own (seeded) order.
        return L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=self.cfg.steps,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         use_distributed_sampler=False, callbacks=[clock])

    def _ours(self, name: str) -> tuple[list[float], list[float], dict[str, Any], list[TimelineEvent]]:
        os.environ.update(self.env)  # Lightning's teardown deletes WORLD_SIZE
        strategy = PACIStrategy(schedule=OURS[name], micro_batches=self.cfg.micro_batches,
                                num_threads=self.cfg.threads, record_timeline=True, timeout_s=self.cfg.timeout_s)
        clock = StepClock()
        trainer = self._trainer(strategy, self.cfg.stages, clock)
        if self.cfg.lightning_sigterm_broadcast:
            trainer.callbacks.append(_LightningSigtermBroadcast())
        with contextlib.redirect_stdout(io.StringIO()):  # the partition table, once per fit
            trainer.fit(self.model(), train_dataloaders=self.data.train_dataloader())
        runtime = strategy.runtime
        origin = runtime.clock_origin
        events = [e._replace(start=e.start + origin, end=e.end + origin) for e in runtime.timeline]
        telemetry = runtime.telemetry()
        stats = {"stage": self.stage, "peak_memory_bytes": telemetry["peak_memory_bytes"],
                 "max_drift": telemetry["max_drift"], "optimizer_steps": telemetry["optimizer_steps"],
                 "peak_in_flight": telemetry["peak_in_flight"], "utilization_run": telemetry["utilization"],
                 "bubble_fraction_run": telemetry["bubble_fraction"]}
        return clock.ends, clock.losses, stats, events

    def _peer(self, name: str) -> tuple[list[float], list[float], dict[str, Any], list[TimelineEvent]]:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        cfg, stage, n = self.cfg, self.stage, self.cfg.stages
        model = self.model()
        configured = model.configure_optimizers()
        optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
        mine = self.stage_split.stage_units(stage)
        units = OrderedDict((u.replace(".", "_"), model.get_submodule(u)) for u in mine)
        for i in range(n):  # other stages' units hold no memory here, as in ours (hollow.py)
            if i != stage:
                for u in self.stage_split.stage_units(i):
                    model.get_submodule(u).to("meta")
        module = nn.Sequential(units)
        owned = {id(p) for p in module.parameters()}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in owned]
        pipe_stage = PipelineStage(module, stage, n, torch.device("cpu"))
        pipe_stage.stage_index_to_group_rank = {i: n - 1 - i for i in range(n)}  # stage i on rank N-1-i
        schedule_cls = ScheduleGPipe if name == "peer_gpipe" else Schedule1F1B
        schedule = schedule_cls(pipe_stage, n_microbatches=cfg.micro_batches, loss_fn=GPT._loss)
        memory, events, step = PeakMemory(torch.device("cpu")), [], [0]

        def timed(fn: Any, kind: str) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                label = kind if kind in ("S", "loss") else f"{kind}{step[0] * cfg.micro_batches + args[0]}"
                events.append(TimelineEvent(stage, label, start, time.perf_counter()))
                memory.sample()
                return out
            return wrapper

        pipe_stage.forward_one_chunk = timed(pipe_stage.forward_one_chunk, "F")
        pipe_stage.backward_one_chunk = timed(pipe_stage.backward_one_chunk, "B")
        schedule._maybe_compute_loss = timed(schedule._maybe_compute_loss, "loss")
        optimizer_step = timed(optimizer.step, "S")
        ends, step_losses = [], []
        batches = iter(self.data.train_dataloader())
        for step[0] in range(cfg.steps):
            x, y = next(batches)
            losses: list[torch.Tensor] = []
            if stage == 0:
                schedule.step(x)
            elif stage == n - 1:
                schedule.step(target=y, losses=losses, return_outputs=False)
            else:
                schedule.step()
            step_losses.append(float(torch.stack(losses).mean()) if losses else float("nan"))
            optimizer_step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ends.append(time.perf_counter())
        stats = {"stage": stage, "peak_memory_bytes": memory.peak, "max_drift": 0,
                 "optimizer_steps": cfg.steps}
        return ends, step_losses, stats, events

    def concurrency(self, repeats: int = 10) -> dict[str, float]:
        """Does this machine run the stage processes in parallel, and how steadily? Seconds per
        whole-model micro-batch forward+backward (one thread) on each rank alone, then on all ranks at
        once; ``*_cv`` is the coefficient of variation of the repeats: the same work, timed again;
        ``rank_spread``: the slowest rank's mean time over the fastest's, minus 1, all at once."""
        model = self.model()
        x, y = next(iter(self.data.train_dataloader()))
        x, y = x[: len(x) // self.cfg.micro_batches], y[: len(y) // self.cfg.micro_batches]

        def seconds() -> list[float]:
            model._loss(model(x), y).backward()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model._loss(model(x), y).backward()
                times.append(time.perf_counter() - start)
            return times

        alone: list[float] = []
        for r in range(self.cfg.stages):
            dist.barrier()
            if r == self.rank:
                alone = seconds()
        dist.barrier()
        together = seconds()
        gathered: list[Any] = [None] * self.cfg.stages
        dist.all_gather_object(gathered, (alone, together))

        def per_rank(k: int) -> tuple[list[float], float]:  # each rank's mean, and the mean CV
            means = [statistics.fmean(g[k]) for g in gathered]
            return means, statistics.fmean(statistics.pstdev(g[k]) / m for g, m in zip(gathered, means))

        (alone_means, alone_cv), (together_means, together_cv) = per_rank(0), per_rank(1)
        alone_s, together_s = statistics.fmean(alone_means), statistics.fmean(together_means)
        return {"alone_s": alone_s, "together_s": together_s, "slowdown": together_s / alone_s,
                "parallel_speedup": self.cfg.stages * alone_s / together_s,
                "alone_cv": alone_cv, "together_cv": together_cv,
                "rank_spread": max(together_means) / min(together_means) - 1.0}

    def single(self, name: str) -> dict[str, Any]:
        """The whole model in this process, one device, one thread or every core (rank 0 only)."""
        threads = 1 if name == "single_1thread" else os.cpu_count() or 1
        for key in _DIST_ENV:  # a plain single-device run, not a member of a process group
            os.environ.pop(key, None)
        torch.set_num_threads(threads)
        try:
            gc.collect()
            before = PeakMemory(torch.device("cpu")).in_use()
            model, memory = self.model(), PeakMemory(torch.device("cpu"))
            model.register_forward_hook(lambda *_: memory.sample() and None)  # activations are alive here
            clock = StepClock(memory)
            trainer = self._trainer("auto", 1, clock)
            trainer.fit(model, train_dataloaders=self.data.train_dataloader())
        finally:
            os.environ.update(self.env)
            torch.set_num_threads(self.cfg.threads)
        return {"name": name, "threads": threads, "tokens_per_s": self._rate(clock.ends), **_losses(clock.losses),
                "stages": [{"stage": "all", "peak_memory_bytes": memory.peak,
                            "run_memory_bytes": memory.peak - before}]}


class _CpuProbe:
    """CPU seconds of this process, and of the whole machine (/proc/stat), over one run: what other
    processes took shows machine noise that would skew the run."""

    def __init__(self) -> None:
        self.own, self.busy, self.wall = self._own(), self._busy(), time.perf_counter()

    @staticmethod
    def _own() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process (gloo's too)
        return usage.ru_utime + usage.ru_stime

    @staticmethod
    def _busy() -> float:
        try:  # user nice system idle iowait irq softirq steal ... in clock ticks
            ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        return (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> tuple[float, float, float]:
        return self._own() - self.own, self._busy() - self.busy, time.perf_counter() - self.wall

    @staticmethod
    def wait_quiet(limit_s: float, share: float = 0.05) -> None:
        """Sleep in 1 s samples until the machine (other processes: ours are idle now) is busy less than
        ``share`` of its CPU time, or ``limit_s`` has passed."""
        deadline = time.perf_counter() + limit_s
        while time.perf_counter() < deadline:
            busy, start = _CpuProbe._busy(), time.perf_counter()
            time.sleep(1.0)
            if (_CpuProbe._busy() - busy) / ((time.perf_counter() - start) * (os.cpu_count() or 1)) < share:
                return

    @staticmethod
    def foreign(usage: list[tuple[float, float, float]]) -> float:
        """Share of the machine's CPU time (cores x wall) that processes other than ours used."""
        own = sum(u[0] for u in usage)
        _, busy, wall = usage[0]
        return max(0.0, busy - own) / (wall * (os.cpu_count() or 1))


def _losses(losses: list[float]) -> dict[str, float]:
    """First and last step's training loss: equal across schedules that train the same model on the
    same batches synchronously (a check that all runs do the same work)."""
    return {"loss_first": losses[0], "loss_last": losses[-1]}


def _loss_into_forward(events: list[TimelineEvent]) -> list[TimelineEvent]:
    """The peer's timeline with each loss computation (its own event, after the forward) counted as
    part of the forward before it, as ours counts it: what the plan's replay needs."""
    out: list[TimelineEvent] = []
    last_forward: dict[int, int] = {}
    for e in sorted(events, key=lambda e: e.start):
        if e.action == "loss" and e.stage in last_forward:
            f = out[last_forward[e.stage]]
            out[last_forward[e.stage]] = f._replace(end=f.end + e.duration)
            continue
        if e.category == "forward":
            last_forward[e.stage] = len(out)
        out.append(e)
    return out


def _mean_costs(events: list[TimelineEvent], window: tuple[float, float]) -> dict[str, float]:
    """Mean compute seconds of forward, backward (the peer: with its loss) and step in the window, and
    the coefficient of variation of forward and backward (``*_cv``): how much the same action's time
    varies, which a schedule without slack pays for (see ``replay_utilization``)."""
    inside = [e for e in events if window[0] <= e.start and e.end <= window[1]]
    out = {}
    for key in ("forward", "backward", "step"):
        durations = [e.duration for e in inside if e.category == key]
        out[f"{key}_s"] = statistics.fmean(durations) if durations else 0.0
        if key != "step":
            out[f"{key}_cv"] = statistics.pstdev(durations) / out[f"{key}_s"] if len(durations) > 1 else 0.0
    return out


def _worker(rank: int, cfg: Config, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(cfg.stages), NODE_RANK="0")
    _quiet()
    torch.set_num_threads(cfg.threads)
    dist.init_process_group("gloo", rank=rank, world_size=cfg.stages, timeout=timedelta(seconds=cfg.timeout_s))
    bench, runs, timelines, concurrency = Bench(cfg, rank), [], {}, []
    for r in range(cfg.rounds):
        if rank == 0:
            _CpuProbe.wait_quiet(cfg.quiet_wait_s)
        concurrency.append(bench.concurrency())
        order = PIPELINES[r % len(PIPELINES):] + PIPELINES[: r % len(PIPELINES)]
        for name in list(order) + (list(SINGLES) if cfg.single else []):
            if rank == 0:
                _CpuProbe.wait_quiet(cfg.quiet_wait_s)
            dist.barrier()
            probe = _CpuProbe()
            if name in SINGLES:  # the other ranks wait in the gather below (gloo waits do not spin)
                result = bench.single(name) if rank == 0 else {}
            else:
                result = bench.run(name)
            usage: list[Any] = [None] * cfg.stages
            dist.all_gather_object(usage, probe.stop())
            if rank == 0:
                result["foreign_cpu"] = _CpuProbe.foreign(usage)
                timeline = result.pop("timeline", None)
                if r == cfg.rounds - 1 and timeline is not None:
                    timelines[name] = timeline
                runs.append({**result, "round": r})
                print(f"round {r + 1}/{cfg.rounds}  {name:<16} {result['tokens_per_s']:9.0f} tokens/s  "
                      f"(other processes used {100 * result['foreign_cpu']:.1f}% of the CPU)", flush=True)
    dist.barrier()
    if rank == 0:
        model = {"parameters": bench.model().num_parameters(),
                 "stages": [bench.stage_split.stage_units(i) for i in range(cfg.stages)]}
        report(cfg, model, runs, timelines, concurrency)
    dist.destroy_process_group()


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


# -- entry point -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    cfg = parse(argv)
    # Build the token cache once, here, before the stage processes read it.
    StdlibCorpus(max_bytes=cfg.max_bytes, block_size=cfg.block_size, batch_size=cfg.batch_size, val_batches=1,
                 cache_dir=cfg.cache_dir, seed=cfg.seed).prepare_data()
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    mp.spawn(_worker, args=(cfg, find_free_network_port()), nprocs=cfg.stages, join=True)


if __name__ == "__main__":
    main()
