"""The benchmark's settings: a typed dataclass, every field a command-line flag (``--micro-batches 8``).

recipes/benchmark.py runs with them and recipes/benchmark_report.py reads them back from a stored
``benchmark.json``; both import them from here, so neither imports the other's module for them.
"""

from __future__ import annotations

import argparse
import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting; each is a command-line flag (``--micro-batches 8``)."""

    stages: int = 2
    micro_batches: int = 4
    batch_size: int = 16  # sequences per step: 4 per micro-batch
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 8
    n_embd: int = 512  # head size 64 as GPT-2; 13M parameters, a forward of ~70 ms per stage and micro-batch here
    steps: int = 20  # K steps per run ...
    warmup_steps: int = 4  # ... of which the first w are not timed ...
    cooldown_steps: int = 1  # ... nor the last c: the pipeline's end of run (see the module docstring)
    rounds: int = 3
    threads: int = 1  # torch threads per stage process
    single: bool = True  # also time single-process training of the whole model
    lightning_sigterm_broadcast: bool = False  # True: undo the strategy's removal of it (see above)
    max_bytes: int = 2_000_000  # corpus size (stdlib sources, byte tokens)
    cache_dir: str = "data_cache"
    out: str = "runs/benchmark"
    seed: int = 1337
    timeout_s: float = 300.0
    quiet_wait_s: float = 120.0  # before each run, wait up to this long for other processes to go quiet


def parse(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(prog="python recipes/benchmark.py",
                                     description="Throughput, utilization and memory of PACI against 1F1B-flush, "
                                                 "GPipe, torch's pipelining and one process (see its docstring).")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.batch_size % cfg.micro_batches:
        parser.error(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batches {cfg.micro_batches}")
    if cfg.warmup_steps < 1 or cfg.cooldown_steps < 0:
        parser.error(f"need --warmup-steps >= 1 and --cooldown-steps >= 0, got {cfg.warmup_steps} and "
                     f"{cfg.cooldown_steps}")
    if cfg.steps < cfg.warmup_steps + cfg.cooldown_steps + 2:
        parser.error("need at least two timed steps (--steps >= --warmup-steps + --cooldown-steps + 2) for the "
                     "Gantt chart")
    return cfg
