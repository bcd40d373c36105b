"""What DP x PP would give with N=8 stages and R=1..8 replicas, from costs measured on this machine.

    python recipes/dp_pp_prediction.py --costs runs/benchmark/costs.json --parameters 3323392

1. Measures gloo's all-reduce of one stage's gradients (``parameters / 8`` float32 values) over 2 and
   4 processes (this machine's most), and fits the ring all-reduce's cost ``2 (R-1) (alpha + bytes /
   (R beta))``: alpha, beta from the two points. Over real nodes both differ; the fit is this host's.
2. Splits the benchmark's measured per-stage forward/backward/step costs (``costs.json`` of
   ``recipes/benchmark.py``, any number of stages) evenly over 8 stages, and simulates each schedule
   with the fitted all-reduce per R (``lightning_paci.simulate``: the all-reduce runs beside the
   window's last backward, S waits for it). Throughput of R replicas = R x one replica's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_paci.simulate import CostModel, simulate_schedule

N = 8


def _time_allreduce(rank: int, world: int, numel: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    grad = torch.ones(numel)
    times = []
    for k in range(25):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(grad)
        if k >= 5:  # warm-up
            times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(statistics.median(times)))
    dist.destroy_process_group()


def measure(numel: int, world: int, port: int) -> float:
    out = f"/tmp/dp_pp_allreduce_{world}.json"
    mp.spawn(_time_allreduce, args=(world, numel, port, out), nprocs=world)
    return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--costs", required=True, help="costs.json written by recipes/benchmark.py")
    parser.add_argument("--parameters", type=int, required=True, help="the model's parameter count")
    parser.add_argument("--micro-batches", type=int, default=8)
    args = parser.parse_args()
    measured = CostModel.from_json(json.loads(Path(args.costs).read_text()))
    numel = args.parameters // N
    t2, t4 = measure(numel, 2, 29561), measure(numel, 4, 29562)
    # ring: t(R) = 2 alpha + 2 (R-1)/R * bytes / beta; two points give alpha and bytes/beta
    per_byte = max(0.0, (t4 / 6 - t2 / 2) / (1 / 4 - 1 / 2))  # t/(2(R-1)) = alpha + (bytes/beta)/R at R=2, 4
    alpha = max(0.0, t2 / 2 - per_byte / 2)
    print(f"gloo all-reduce of {numel} float32 ({numel * 4 / 2**20:.2f} MiB): R=2 {t2 * 1e3:.2f} ms, R=4 "
          f"{t4 * 1e3:.2f} ms; ring fit alpha {alpha * 1e3:.3f} ms, bytes/beta {per_byte * 1e3:.3f} ms")
    costs = CostModel.uniform(N, sum(measured.forward) / N, sum(measured.backward) / N, sum(measured.step) / N)
    print(f"per stage (measured {measured.n_stages}-stage costs split over {N}): forward "
          f"{costs.forward[0] * 1e3:.2f} ms, backward {costs.backward[0] * 1e3:.2f} ms, "
          f"step {costs.step[0] * 1e3:.2f} ms")
    print("| R | GPUs | all-reduce ms | paci micro-batches/s | pipe_1f1b micro-batches/s | paci / pipe_1f1b |")
    print("|---|---|---|---|---|---|")
    for r in range(1, 9):
        ar = 0.0 if r == 1 else 2 * (r - 1) * (alpha + per_byte / r)
        with_ar = replace(costs, allreduce=(ar,) * N)
        rates = {s: r * simulate_schedule(s, with_ar, args.micro_batches, replicas=r).rate()
                 for s in ("paci", "1f1b")}
        print(f"| {r} | {N * r} | {ar * 1e3:.2f} | {rates['paci']:.1f} | {rates['1f1b']:.1f} | "
              f"{rates['paci'] / rates['1f1b']:.3f} |")


if __name__ == "__main__":
    main()
