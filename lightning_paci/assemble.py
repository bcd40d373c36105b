"""One pipeline stage assembled from the user's LightningModule: its split, its view, its runtime.

``PACIStrategy.setup`` calls these in order on every stage process:

1. ``split_model``: the module's units cut into stages (partition.py), with the schedule's rule on
   weights tied across stages (tied.py); the same call checks the split in the main process before
   any stage starts.
2. ``stage_view``: this stage's view of the module (hollow.py), its own units materialized on its
   device (materialize.py: layers built on the meta device in ``configure_model``).
3. ``build_runtime``: the executor of this stage's actions (runtime.py), wired to its neighbours (a
   ``StageLink``), to the other holders of tied weights and to its data-parallel replicas.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule

from lightning_paci.allreduce import ReplicaGradients
from lightning_paci.hollow import StageView
from lightning_paci.hooks import StageHooks
from lightning_paci.materialize import materialize
from lightning_paci.mesh import MeshGroups, PipelineLayout
from lightning_paci.p2p import StageLink
from lightning_paci.partition import Partition, partition_model
from lightning_paci.runtime import StageRuntime
from lightning_paci.schedules import PlanSpec
from lightning_paci.tied import TiedCopies, TiedGradients, check_tied_schedule


def split_model(module: LightningModule, n_stages: int, split_points: list[str] | None, partition: str,
                schedule: str) -> Partition:
    """The module's units per stage, by ``split_points`` or balanced by ``partition`` (the mode)."""
    split = partition_model(module, n_stages, split_points, partition)
    check_tied_schedule(split, schedule)
    return split


def stage_view(module: LightningModule, split: Partition, stage: int, device: torch.device,
               view: StageView | None) -> StageView:
    """This stage's view of ``module``, its own units materialized on ``device``; a later validate or
    test of the same module reuses ``view`` (its units are materialized already)."""
    if view is not None and view.model is module:
        return view
    units = dict(zip(split.units, split.stage_of))
    others = [u for u, s in units.items() if s != stage and u not in split.shared]
    view = StageView(module, units, stage, split.n_stages)
    materialize(module, device, skip=others)  # layers built in configure_model (meta)
    return view


def build_runtime(module: LightningModule, view: StageView, split: Partition, spec: PlanSpec, link: StageLink, *,
                  layout: PipelineLayout, groups: MeshGroups | None, timeout: timedelta, fitting: bool,
                  optimizer: torch.optim.Optimizer | None, aliases: list[tuple[Any, Any]], schedulers: list[Any],
                  precision_plugin: Any, log_every_n_steps: int, record_timeline: bool,
                  skip_nonfinite_windows: bool, seed: int, previous: StageRuntime | None) -> StageRuntime:
    """The runtime of stage ``view.stage``; ``previous`` is the runtime of an earlier fit or
    evaluation of this strategy (its replica hooks are removed: one hook per parameter)."""
    stage, replicas = view.stage, spec.replicas
    if fitting and split.tied and replicas > 1 and spec.schedule == "paci":
        raise ValueError("weights tied across stages with data-parallel replicas are not supported under "
                         "schedule='paci' yet: use schedule='1f1b' or 'gpipe', untie them, or run one replica "
                         "(devices x num_nodes = stages)")
    tied = None
    if fitting and split.tied:  # PACI: bounded-stale copies; flush: a sum over each replica's holders
        pipelines = [layout.pipeline_ranks(r) for r in range(replicas)]
        tied = (TiedCopies(module, split, stage, pipelines[0], spec, timeout) if spec.schedule == "paci" else
                TiedGradients(module, split, stage, pipelines, layout.place(dist.get_rank()).replica, timeout))
    if previous is not None and previous.replicas is not None:
        previous.replicas.remove()
    averaging = (ReplicaGradients([p for p, _ in aliases], groups.replica_group, replicas)
                 if replicas > 1 and fitting else None)
    return StageRuntime(
        module, view, spec, link, optimizer=optimizer if fitting else None, aliases=aliases,
        schedulers=schedulers, tied=tied, device=link.device, forward_context=precision_plugin.forward_context,
        hooks=StageHooks(module, precision_plugin, stage, log_every_n_steps),
        record_timeline=record_timeline, skip_nonfinite_windows=skip_nonfinite_windows,
        seed=seed, replicas=averaging)
