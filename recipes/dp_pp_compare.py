"""Measured throughput of DP x PP against DP only (Lightning's DDP) and PP only, on this machine.

    python recipes/dp_pp_compare.py --mode dpxpp   # PACIStrategy(stages=2) on 4 processes: R=2 x N=2
    python recipes/dp_pp_compare.py --mode ddp     # Lightning's "ddp" on 4 processes
    python recipes/dp_pp_compare.py --mode pp      # PACIStrategy on 2 processes: one pipeline

One GPT (recipes/gpt.py, random tokens: throughput does not depend on the text), the same batch per
replica and one thread per process. Tokens/s count every replica's tokens, timed on rank 0 from the
end of the warm-up batches to the end of the last batch.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_paci import PACIStrategy
from recipes.gpt import GPT


class _Clock(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.batches = warmup, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer, *args) -> None:
        self.batches += 1
        if self.batches == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("dpxpp", "ddp", "pp"), required=True)
    parser.add_argument("--schedule", default="paci")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16, help="per replica")
    parser.add_argument("--block-size", type=int, default=64)
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    replicas = {"dpxpp": 2, "ddp": 4, "pp": 1}[args.mode]
    devices = {"dpxpp": 4, "ddp": 4, "pp": 2}[args.mode]
    n = args.batch_size * args.steps * replicas
    tokens = torch.randint(0, 256, (n, args.block_size + 1))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=args.batch_size, drop_last=True)
    model = GPT(vocab_size=256, block_size=args.block_size, n_layer=4, n_embd=128, max_steps=args.steps)
    strategy = "ddp" if args.mode == "ddp" else PACIStrategy(schedule=args.schedule, micro_batches=4, stages=2,
                                                              num_threads=1)
    clock = _Clock(args.warmup)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_steps=args.steps,
                        callbacks=[clock], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    torch.set_num_threads(1)
    trainer.fit(model, loader)
    if trainer.global_rank == 0:
        timed = clock.batches - args.warmup
        rate = timed * args.batch_size * args.block_size * replicas / (clock.end - clock.start)
        print(f"RESULT {args.mode} ({args.schedule if args.mode != 'ddp' else 'ddp'}, {devices} processes, "
              f"{replicas} replicas): {rate:.0f} tokens/s over {timed} batches", flush=True)


if __name__ == "__main__":
    main()
