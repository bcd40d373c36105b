"""Single-process references the pipeline runs are checked against.

- ``train_reference``: ordinary non-pipelined training of the whole model (what synchronous
  schedules must reproduce to float tolerance).
- ``replay_plan``: one process executes a plan's actions stage by stage, in any order its data
  dependencies allow, with each stage's own optimizer stepping at its S actions and backwards using
  the stage's current weights (PACI's semantics). It shares nothing with the runtime but the plan.
  ``replay_segments`` runs several plans one after another (a drain between two), as a run with
  validations or epoch ends in between does. ``skip={stage: {window, ...}}`` makes those S actions
  (counted from 0 per stage) drop their gradients without an optimizer step; the LR scheduler still
  steps (skip_nonfinite_windows' semantics, stated here independently of how the runtime decides).
  ``tied_lag``: nanoGPT's tying (``wte.weight = lm_head.weight``) under PACI, as tests/tied_replay.py
  states it (the first stage steps the weight, the last stage keeps a copy ``tied_lag`` steps stale).
- ``epoch_batches``: the batches Lightning's DistributedSampler (one replica, seed 0) yields.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler, TensorDataset

from lightning_paci.plan import Plan
from tests.models import LitTiny, loader, token_data
from tests.tied_replay import TiedReplay


def fresh_model(n_layers: int, dtype: torch.dtype = torch.float64, extras: bool = False) -> LitTiny:
    L.seed_everything(0, verbose=False)  # the same initial weights as tests/pipeline_script.py
    return LitTiny(n_layers=n_layers, dtype=dtype, extras=extras)


def _optimizer(params, sched: bool):
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s)) if sched else None
    return opt, scheduler


def batches(batch_size: int, steps: int, accumulate: int = 1) -> list:
    return list(loader(batch_size, n=batch_size * steps * accumulate))


def epoch_batches(batch_size: int, n_batches: int, epochs: int, shuffle: bool) -> list:
    """What Lightning feeds ``loader(batch_size, n=batch_size * n_batches)`` over ``epochs`` epochs
    under a distributed strategy: its DistributedSampler (one replica, seed 0, set_epoch(e))."""
    x, y = token_data(batch_size * n_batches)
    out = []
    for epoch in range(epochs):
        sampler = DistributedSampler(TensorDataset(x, y), num_replicas=1, rank=0, shuffle=shuffle, seed=0)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        out += [(x[idx], y[idx]) for idx in order.split(batch_size)]
    return out


def replica_batches(batch_size: int, n_batches: int, replicas: int) -> list[list[tuple]]:
    """What each of ``replicas`` data-parallel replicas reads from ``loader(batch_size, n=batch_size *
    n_batches * replicas)`` in epoch 0: Lightning's shuffled DistributedSampler (seed 0) with
    ``num_replicas=replicas, rank=r``; item k holds every replica's batch k."""
    x, y = token_data(batch_size * n_batches * replicas)
    shards = []
    for r in range(replicas):
        order = torch.tensor(list(DistributedSampler(TensorDataset(x, y), replicas, r, shuffle=True, seed=0)))
        shards.append([(x[idx], y[idx]) for idx in order.split(batch_size)])
    return [list(batch) for batch in zip(*shards)]


def train_reference(n_layers: int, data: list, accumulate: int = 1, sched: bool = False,
                    extras: bool = False, lit: LitTiny | None = None) -> dict:
    lit = lit if lit is not None else fresh_model(n_layers, extras=extras)
    opt, scheduler = _optimizer(lit.parameters(), sched)
    for k, (x, y) in enumerate(data):
        loss = F.cross_entropy(lit.model(x).flatten(0, 1), y.flatten()) / accumulate
        loss.backward()
        if (k + 1) % accumulate == 0:
            opt.step()
            opt.zero_grad()
            if scheduler:
                scheduler.step()
    return lit.state_dict()


def _run_units(lit: LitTiny, names: list[str], x: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    """TinyGPT's forward restricted to some of its units (it is written out, not traced)."""
    tok = None
    for name in names:
        module = lit.get_submodule(name)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "wte":
            tok = module(idx)
        elif leaf == "wpe":
            x = tok + module(torch.arange(idx.size(1)))
        else:
            x = module(x)
    return x


def replay_plan(plan: Plan, stage_units: list[list[str]], n_layers: int, data: list,
                sched: bool = False, skip: dict[int, set[int]] | None = None) -> dict:
    return replay_segments([plan], stage_units, n_layers, data, sched, skip)[-1]


def replay_segments(plans: list[Plan], stage_units: list[list[str]], n_layers: int, data: list,
                    sched: bool = False, skip: dict[int, set[int]] | None = None,
                    tied_lag: int | None = None) -> list[dict]:
    """Each plan on the next ``plan.n_batches`` batches of ``data``; the model after each (a copy).
    Gradients of a window a plan leaves open stay accumulated into the next one."""
    lit = fresh_model(n_layers)
    tied = None
    if tied_lag is not None:
        lit.model.transformer.wte.weight = lit.model.lm_head.weight  # the tying the run made
        lit.model.lm_head.weight = nn.Parameter(lit.model.lm_head.weight.detach().clone())  # the last stage's copy
        tied = TiedReplay(lit.model.transformer.wte.weight, lit.model.lm_head.weight, 0, len(stage_units) - 1,
                          tied_lag)
    stages = []
    for units in stage_units:
        params = [p for u in units for p in lit.get_submodule(u).parameters()
                  if tied is None or p is not tied.holder]
        aliases = [nn.Parameter(p.data) for p in params]
        stages.append((params, aliases, *_optimizer(aliases, sched)))
    snapshots, offset, windows = [], 0, [0] * len(stage_units)
    for plan in plans:
        _replay(plan, stage_units, lit, stages, data[offset:offset + plan.n_batches], skip or {}, windows, tied)
        if tied is not None:
            tied.drained()
        offset += plan.n_batches
        snapshots.append({k: v.clone() for k, v in lit.state_dict().items()})
    assert offset == len(data), f"the plans train {offset} batches, the data has {len(data)}"
    return snapshots


def _replay(plan: Plan, stage_units: list[list[str]], lit: LitTiny, stages: list, data: list,
            skip: dict[int, set[int]], windows: list[int], tied: TiedReplay | None = None) -> None:
    m, n = plan.micro_batches, plan.n_stages
    micro = {}
    for k, (x, y) in enumerate(data):
        for part, (xs, ys) in enumerate(zip(x.chunk(m), y.chunk(m))):
            micro[k * m + part] = (xs, ys)
    sent = [{} for _ in range(n)]        # activations stage i sent, by micro-batch
    grads = [{} for _ in range(n)]       # gradients stage i sent back, by micro-batch
    saved = [{} for _ in range(n)]
    cursor = [0] * n
    while any(cursor[i] < len(plan.stages[i]) for i in range(n)):
        progressed = False
        for i in range(n):
            while cursor[i] < len(plan.stages[i]):
                action, j = plan.stages[i][cursor[i]], plan.stages[i][cursor[i]].micro_batch
                if action.kind == "F":
                    if i > 0 and j not in sent[i - 1]:
                        break
                    idx, target = micro[j]
                    inp = sent[i - 1][j].detach().requires_grad_(True) if i > 0 else None
                    out = _run_units(lit, stage_units[i], inp, idx)
                    if i == n - 1:
                        out = F.cross_entropy(out.flatten(0, 1), target.flatten()) / plan.accumulation
                    sent[i][j] = out
                    saved[i][j] = (inp, out)
                elif action.kind == "B":
                    if i < n - 1 and j not in grads[i + 1]:
                        break
                    inp, out = saved[i].pop(j)
                    out.backward(grads[i + 1].pop(j) if i < n - 1 else None)
                    if inp is not None:
                        grads[i][j] = inp.grad
                else:
                    if tied is not None and not tied.ready(i, windows[i]):
                        break
                    if tied is not None:
                        tied.before_step(i, windows[i])
                    params, aliases, opt, scheduler = stages[i]
                    for p, a in zip(params, aliases):
                        a.grad = p.grad
                    if windows[i] not in skip.get(i, ()):
                        opt.step()
                    if tied is not None:
                        tied.after_step(i, windows[i])
                    windows[i] += 1
                    if scheduler:
                        scheduler.step()
                    for p, a in zip(params, aliases):
                        p.grad = a.grad = None
                cursor[i] += 1
                progressed = True
        assert progressed, "plan deadlocked in replay"
