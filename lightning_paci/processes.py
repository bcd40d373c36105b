"""Where each stage process runs and how it reaches the others: the process half of ``PACIStrategy``.

``PipelineProcesses`` is a Lightning ``ParallelStrategy`` that knows the pipeline's processes and
nothing of its loop: a process's place (stage, replica) from its global rank (``mesh.PipelineLayout``),
its device and torch threads, where the model's tensors are built (the meta device, for
``configure_model`` and ``init_module(empty_init=True)``) and placed (this stage's own only), the
default process group and the mesh's groups, the failure watch, the link to its neighbouring stages,
and the collectives Lightning calls. ``PACIStrategy``
(strategy.py) adds the hooks into Lightning's loop on top of it, as Lightning's ``DDPStrategy`` adds
DDP to ``ParallelStrategy``.

Collectives reach a stage's replicas only (``mesh.reduce_over_replicas``): a collective with the
other stages would stall them in the middle of the pipeline.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    _destroy_dist_connection,
    _get_default_process_group_backend_for_device,
    _init_dist_connection,
)
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_paci.mesh import (
    MeshGroups,
    PipelineLayout,
    build_groups,
    gather_over_replicas,
    reduce_over_replicas,
)
from lightning_paci.p2p import FailureWatch, StageLink


class PipelineProcesses(ParallelStrategy):
    """``stages`` pipeline stages (default: one per process) times R replicas over the Trainer's
    ``devices x num_nodes`` processes; see ``PACIStrategy`` for the arguments."""

    def __init__(self, stages: int | None, timeout_s: float, num_threads: int | None,
                 process_group_backend: str | None, **plugins: Any) -> None:
        super().__init__(**plugins)
        self.stages = stages
        self._timeout = timedelta(seconds=timeout_s)
        self._num_threads = num_threads
        self._process_group_backend = process_group_backend
        self._num_nodes = 1
        self._groups: MeshGroups | None = None
        self._failure_watch: FailureWatch | None = None

    # -- sizes and placement -----------------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return self.stages or self.num_processes * self.num_nodes

    @property
    def layout(self) -> PipelineLayout:
        return PipelineLayout.for_world(self.n_stages, self.num_processes * self.num_nodes)

    @property
    def stage(self) -> int:
        return self.layout.place(self.global_rank).stage

    @property
    def replica(self) -> int:
        return self.layout.place(self.global_rank).replica

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:  # set by Lightning's connector from Trainer(num_nodes)
        self._num_nodes = num_nodes

    @property
    def shares_device(self) -> bool:
        """``stages=N`` on one device: N stage processes share it (a smoke test of one GPU: NCCL refuses
        two ranks on one device, so they talk over gloo, CUDA tensors staged through host memory)."""
        return (self.stages or 1) > 1 and self.parallel_devices is not None and len(self.parallel_devices) == 1

    @property
    def num_processes(self) -> int:
        if self.parallel_devices is None:
            return 0
        return self.stages if self.shares_device else len(self.parallel_devices)

    @property
    @override
    def root_device(self) -> torch.device:
        assert self.parallel_devices is not None
        return self.parallel_devices[0 if self.shares_device else self.local_rank]

    @property
    def is_distributed(self) -> bool:
        # Lightning then wraps loaders in a DistributedSampler built from distributed_sampler_kwargs,
        # so shuffle=True gives every stage the same order (seeded by epoch), whatever each process's RNG
        # did meanwhile (dropout runs on some stages only), and sync_dist reaches reduce().
        return True

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every stage of one replica reads the same batches in the same order; replicas read shards.
        return {"num_replicas": self.layout.replicas, "rank": self.replica}

    # -- inside each process -----------------------------------------------------------------------------
    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.root_device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(self._num_threads or max(1, (os.cpu_count() or 1) // max(self.num_processes, 1)))
        elif self._num_threads:
            torch.set_num_threads(self._num_threads)
        self.set_world_ranks()
        backend = self._process_group_backend or ("gloo" if self.shares_device else
                                                  _get_default_process_group_backend_for_device(self.root_device))
        self._process_group_backend = backend
        if not dist.is_initialized():
            _init_dist_connection(self.cluster_environment, backend, timeout=self._timeout)
            if backend != "nccl":  # Lightning registers this for NCCL only; a gloo group left to the
                # interpreter's finalization can abort the process ("terminate called without an
                # active exception", pytorch/pytorch#190489)
                atexit.register(_destroy_dist_connection)
        if self._failure_watch is None:
            self._failure_watch = FailureWatch(self.stage)
            self._failure_watch.start()
        self._groups = build_groups(self.layout, self.global_rank, self.root_device.type, self._timeout,
                                    host_headers=backend == "nccl")

    @override
    def model_to_device(self) -> None:
        # This stage's own tensors only: the other stages' units stay on the meta device.
        assert self.model is not None
        for p in self.model.parameters():
            if not p.is_meta:
                p.data = p.data.to(self.root_device)
        for name, buf in self.model.named_buffers():
            if not buf.is_meta:
                owner, _, attr = name.rpartition(".")
                self.model.get_submodule(owner)._buffers[attr] = buf.to(self.root_device)

    @override
    @contextmanager
    def model_sharded_context(self) -> Generator[None, None, None]:
        """``configure_model`` builds on the meta device; each stage then materializes its own units."""
        with torch.device("meta"):
            yield

    @override
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        """``with trainer.init_module(empty_init=True)``: the model is built on the meta device, as under
        FSDP, and each stage materializes only its own units (materialize.py); otherwise as Lightning."""
        if not empty_init:
            with super().tensor_init_context(empty_init):
                yield
            return
        with torch.device("meta"), self.precision_plugin.tensor_init_context():
            yield

    def set_world_ranks(self) -> None:
        if self.cluster_environment is not None:
            self.cluster_environment.set_global_rank(self.node_rank * self.num_processes + self.local_rank)
            self.cluster_environment.set_world_size(self.num_nodes * self.num_processes)
        rank_zero_only.rank = self.global_rank

    def stage_link(self) -> StageLink:
        """This stage's point-to-point link to its neighbours in its replica's pipeline."""
        prev_rank, next_rank = self.layout.neighbours(self.global_rank)
        return StageLink(self.stage, prev_rank=prev_rank, next_rank=next_rank, device=self.root_device,
                         groups=self._groups.boundaries if self._groups is not None else None,
                         staged=self.root_device.type != "cpu" and self._process_group_backend == "gloo",
                         timeout_s=self._timeout.total_seconds())

    # -- collectives ---------------------------------------------------------------------------------------
    @override
    def reduce(self, tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        # Values logged with sync_dist come from the last stage: reduced over its replicas (DDP's value),
        # never over other stages (a collective with them would stall them mid-pipeline).
        return reduce_over_replicas(tensor, self._groups, reduce_op)

    @override
    def all_gather(self, tensor: Tensor, group: Any = None, sync_grads: bool = False) -> Tensor:
        return gather_over_replicas(tensor, self._groups)  # DDP's result, over this stage's replicas

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        flag = torch.tensor(int(decision), device=self.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.SUM)
        return bool(flag == self.world_size) if all else bool(flag)

    @override
    def barrier(self, name: str | None = None) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    @override
    def teardown(self) -> None:
        if self._failure_watch is not None:
            self._failure_watch.done.set()
            self._failure_watch = None
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        if self.accelerator is not None:
            self.accelerator.teardown()
