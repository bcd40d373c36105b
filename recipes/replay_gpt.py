"""One process replays the recipe's training in a schedule's order: PACI's learning, without processes.

    python recipes/replay_gpt.py --schedule paci --micro-batches 4 --lr 2e-3 --seed 1337 --out runs/r.json
    python recipes/replay_gpt.py --schedule flush --lr 2e-3 model.n_embd=256   # Hydra overrides last

The run is composed from conf/ exactly as recipes/pretrain_gpt.py composes it (same data, same
initial weights under the same seed, same AdamW groups and learning-rate schedule, validation every
``trainer.val_check_interval`` steps). What differs is that one process does every stage's work:

- ``flush``: ordinary synchronous training on whole batches. 1F1B-flush and GPipe compute the same
  updates (tests/test_pipeline_correctness.py checks them against one-process training to float
  tolerance), so one flush replay stands for both at every m.
- ``paci``: the stages' actions in the order of lightning_paci's own PACI plan (one segment per
  validation interval, drained before each validation, as the strategy drains). Each stage steps
  its own AdamW over aliases of its parameters, so a backward still pending reads the updated
  weights with the activations saved at its forward, as the runtime's stages do (../shared/PACI.md).

The staleness is then exactly the runtime's: stage 0 forwards the first micro-batch of the next
batch before its step, and that micro-batch's backward runs after it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `recipes` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

import recipes.pretrain_gpt  # noqa: F401  (registers the config schema the composition needs)
from lightning_paci.dataflow import advance
from lightning_paci.partition import partition_model
from lightning_paci.schedules import PlanSpec
from recipes.gpt import lr_factor
from recipes.pretrain_gpt import CONF_DIR
from recipes.staleness_remedies import BY_ORIGIN, REMEDIES, make_remedy

SCHEDULES = ("flush", "paci")


def compose_run(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


class Stage:
    """One stage's units and its own optimizer and schedule, built over aliases of its parameters
    (in-place steps then leave the parameters' autograd versions alone, as in the runtime)."""

    def __init__(self, model: nn.Module, units: list[str], hp, remedy: str | None = None) -> None:
        self.units = [(name, model.get_submodule(name)) for name in units]
        self.params = [p for _, u in self.units for p in u.parameters()]
        self.remedy = make_remedy(remedy, self.params)  # recipes/staleness_remedies.py
        self.stale_by_origin = remedy in BY_ORIGIN
        self.steps = 0  # a backward is stale when the stage stepped since that micro-batch's forward
        self.aliases = [nn.Parameter(p.data) for p in self.params]
        groups = [  # the recipe's groups (recipes/gpt.py configure_optimizers)
            {"params": [a for a in self.aliases if a.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [a for a in self.aliases if a.dim() < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        warmup = max(1, round(hp.warmup_fraction * hp.max_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup, hp.max_steps, hp.min_lr_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, unit in self.units:
            x = unit(x)
        return x

    def step(self) -> None:
        if self.remedy is not None:
            self.remedy.before_step()
        for p, a in zip(self.params, self.aliases):
            a.grad = p.grad
        self.optimizer.step()
        self.scheduler.step()
        for p, a in zip(self.params, self.aliases):
            p.grad = a.grad = None
        self.steps += 1


def _segment(plan, stages: list[Stage], batches: list) -> None:
    """Run ``plan`` on ``batches``: each stage's actions in order, as far as its inputs exist."""
    m, n = plan.micro_batches, plan.n_stages
    micro = {}
    for k, (x, y) in enumerate(batches):
        for part, (xs, ys) in enumerate(zip(x.tensor_split(m), y.tensor_split(m))):
            micro[k * m + part] = (xs, ys)
    sent, grads, saved = [{} for _ in range(n)], [{} for _ in range(n)], [{} for _ in range(n)]
    forwarded_at = [{} for _ in range(n)]  # micro-batch -> the stage's step count at its forward
    # micro-batch -> stage 0 forwarded it before the step closing the previous window (its origin is stale)
    origin_stale, first_steps = {}, stages[0].steps
    def run(i: int, _: int, action) -> bool:
        stage, j = stages[i], action.micro_batch
        if action.kind == "F":
            if i > 0 and j not in sent[i - 1]:
                return False
            idx, target = micro[j]
            inp = sent[i - 1][j].detach().requires_grad_(True) if i > 0 else idx
            out = stage.forward(inp)
            if i == n - 1:
                out = F.cross_entropy(out.flatten(0, 1), target.flatten()) / plan.accumulation
            sent[i][j], saved[i][j] = out, (inp, out)
            forwarded_at[i][j] = stage.steps
            if i == 0:
                origin_stale[j] = stage.steps - first_steps < j // plan.accumulation
        elif action.kind == "B":
            if i < n - 1 and j not in grads[i + 1]:
                return False
            inp, out = saved[i].pop(j)
            if stage.remedy is not None:
                stage.remedy.before_backward()
            out.backward(grads[i + 1].pop(j) if i < n - 1 else None)
            stale = forwarded_at[i].pop(j) != stage.steps
            if stage.remedy is not None:
                stage.remedy.after_backward(stale=origin_stale[j] if stage.stale_by_origin else stale)
            if i > 0:
                grads[i][j] = inp.grad
        else:
            stage.step()
        return True

    cursor = advance(plan.stages, run)  # the order lightning_paci's simulator and transport check use
    if any(c < len(actions) for c, actions in zip(cursor, plan.stages)):
        raise RuntimeError(f"the plan deadlocked in the replay at cursors {cursor}")


@torch.no_grad()
def validate(model: nn.Module, loader) -> float:
    """Validation perplexity as the recipe computes it: exp of the token-weighted mean loss."""
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        logits = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return math.exp(total / count)


def replay(schedule: str, micro_batches: int, overrides: list[str], remedy: str | None = None) -> dict:
    """Train one run of the recipe in one process; returns its validation curve and setup."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: choose one of {SCHEDULES}")
    if remedy is not None and schedule != "paci":
        raise ValueError(f"remedy {remedy!r} treats PACI's stale micro-batch: use it with --schedule paci")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each stage process of the recipe (strategy num_threads: 1)
    try:
        return _replay(schedule, micro_batches, overrides, remedy)
    finally:
        torch.set_num_threads(threads)


def _replay(schedule: str, micro_batches: int, overrides: list[str], remedy: str | None) -> dict:
    cfg = compose_run(overrides)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = instantiate(cfg.data)  # the same order of calls as recipes/pretrain_gpt.py build()
    model = instantiate(cfg.model, vocab_size=data.vocab_size)
    data.prepare_data()
    data.setup("fit")
    steps, every = int(cfg.trainer.max_steps), int(cfg.trainer.val_check_interval)
    if cfg.data.batch_size % micro_batches:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is not a multiple of "
                         f"micro_batches={micro_batches}")
    hp = model.hparams
    units = partition_model(model, int(cfg.trainer.devices))
    if schedule == "paci":
        stages = [Stage(model, units.stage_units(i), hp, remedy) for i in range(units.n_stages)]
        spec = PlanSpec("paci", units.n_stages, micro_batches, micro_batches)
    else:  # one optimizer over all parameters: AdamW is per parameter, so the same as one per stage
        stages = [Stage(model, list(units.units), hp)]
    batches = iter(data.train_dataloader())
    curve, start = [], time.perf_counter()
    for done in range(0, steps, every):
        chunk = [next(batches) for _ in range(min(every, steps - done))]
        if schedule == "paci":
            _segment(spec.plan(len(chunk)), stages, chunk)
        else:
            for x, y in chunk:
                F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
                stages[0].step()
        curve.append({"step": done + len(chunk), "ppl": validate(model, data.val_dataloader())})
    return {
        "schedule": schedule, "micro_batches": micro_batches, "overrides": overrides, "remedy": remedy,
        "lr": float(hp.lr), "seed": int(cfg.seed), "steps": steps, "curve": curve,
        "final_ppl": curve[-1]["ppl"], "unigram_ppl": data.val_unigram_perplexity(),
        "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedule", choices=SCHEDULES, default="paci")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: conf/model)")
    parser.add_argument("--seed", type=int, default=None, help="default: conf/config.yaml")
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: conf/trainer)")
    parser.add_argument("--remedy", choices=REMEDIES, default=None,
                        help="treat the stale micro-batch (recipes/staleness_remedies.py); paci only")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/, e.g. model.n_embd=256")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    for key, value in (("model.lr", args.lr), ("seed", args.seed), ("trainer.max_steps", args.steps)):
        if value is not None:
            overrides.append(f"{key}={value}")
    result = replay(args.schedule, args.micro_batches, overrides, args.remedy)
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
