"""Where each stage of each data-parallel replica runs: ranks, process groups and neighbours (DP x PP).

``R`` replicas of an ``N``-stage pipeline run on ``R x N`` processes. Stage ``i`` of replica ``r``
is global rank ``r * N + (N - 1 - i)``:

- the last stage of replica 0 is rank 0, the process Lightning logs from (as with one replica);
- a pipeline holds ``N`` consecutive ranks, so with ``devices`` a multiple of ``N`` its neighbours
  share a node and activations never leave it;
- a stage's replicas are ``N`` ranks apart, on other nodes once there are several: only the once
  per window gradient all-reduce crosses nodes.

The groups are torch.distributed's own: a ``DeviceMesh`` of shape ``(dp, pp)`` whose entry
``[r, i]`` is the rank of stage ``i`` of replica ``r`` (its ``"dp"`` groups are the stages' replica
groups), and per replica the point-to-point groups of its stage boundaries (``p2p.boundary_groups``).
Every rank creates every group in the same order, as torch.distributed requires.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import _sync_ddp

from lightning_paci.p2p import boundary_groups


class Place(NamedTuple):
    replica: int
    stage: int


@dataclass(frozen=True)
class PipelineLayout:
    """``replicas`` copies of an ``n_stages`` pipeline over ``n_stages x replicas`` global ranks."""

    n_stages: int
    replicas: int = 1

    @classmethod
    def for_world(cls, n_stages: int, world_size: int) -> PipelineLayout:
        if n_stages < 1 or world_size % n_stages:
            raise ValueError(f"{world_size} processes (devices x num_nodes) cannot hold whole copies of a "
                             f"{n_stages}-stage pipeline: give the Trainer devices x num_nodes = {n_stages} x R "
                             f"for R data-parallel replicas (e.g. {n_stages} or {2 * n_stages}), or change "
                             "stages")
        return cls(n_stages, world_size // n_stages)

    @property
    def world_size(self) -> int:
        return self.n_stages * self.replicas

    def rank(self, replica: int, stage: int) -> int:
        return replica * self.n_stages + self.n_stages - 1 - stage

    def place(self, rank: int) -> Place:
        replica, position = divmod(rank, self.n_stages)
        return Place(replica, self.n_stages - 1 - position)

    def pipeline_ranks(self, replica: int) -> list[int]:
        """The ranks of stages 0..N-1 of one replica."""
        return [self.rank(replica, i) for i in range(self.n_stages)]

    def replica_ranks(self, stage: int) -> list[int]:
        """The ranks holding one stage, replica 0 first."""
        return [self.rank(r, stage) for r in range(self.replicas)]

    def neighbours(self, rank: int) -> tuple[int | None, int | None]:
        """(previous stage's rank, next stage's rank) in this rank's own pipeline; None at the ends."""
        replica, stage = self.place(rank)
        prev = self.rank(replica, stage - 1) if stage > 0 else None
        nxt = self.rank(replica, stage + 1) if stage < self.n_stages - 1 else None
        return prev, nxt


class MeshGroups(NamedTuple):
    """The groups one rank uses: its stage's replica group (None with one replica), the device mesh
    (None with one replica) and its own pipeline's boundary groups."""

    replica_group: Any
    device_mesh: Any
    boundaries: list[tuple[Any, Any, Any]]


def build_groups(layout: PipelineLayout, rank: int, device_type: str, timeout: timedelta | None = None,
                 host_headers: bool = False) -> MeshGroups:
    """Create every group (a collective over all ranks) and return this rank's."""
    replica = layout.place(rank).replica
    boundaries = []
    for r in range(layout.replicas):  # every rank creates every replica's groups, in one order
        groups = boundary_groups(layout.pipeline_ranks(r), timeout, host_headers=host_headers)
        if r == replica:
            boundaries = groups
    if layout.replicas == 1:
        return MeshGroups(None, None, boundaries)
    from torch.distributed.device_mesh import DeviceMesh

    ranks = torch.tensor([layout.pipeline_ranks(r) for r in range(layout.replicas)])  # (dp, pp)
    mesh = DeviceMesh(device_type, ranks, mesh_dim_names=("dp", "pp"))
    return MeshGroups(mesh.get_group("dp"), mesh, boundaries)


def reduce_over_replicas(tensor: Any, groups: MeshGroups | None, reduce_op: Any = "mean") -> Any:
    """Lightning's DDP reduction (``_sync_ddp``) over this rank's stage replicas; as is with one replica."""
    if groups is None or groups.replica_group is None or not isinstance(tensor, torch.Tensor):
        return tensor
    return _sync_ddp(tensor, group=groups.replica_group, reduce_op=reduce_op)


def gather_over_replicas(tensor: torch.Tensor, groups: MeshGroups | None) -> torch.Tensor:
    """DDP's ``all_gather`` result (replicas x ...) over this rank's stage replicas."""
    if groups is None or groups.replica_group is None:
        return tensor.unsqueeze(0)  # one replica: no collective
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(groups.replica_group))]
    dist.all_gather(parts, tensor.contiguous(), group=groups.replica_group)
    return torch.stack(parts)
