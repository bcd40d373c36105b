"""The plan's ``R``: average one stage's gradients over its data-parallel replicas, overlapped.

``R`` comes right before the backward that ends an accumulation window (plan.py). It arms a hook on
each of the stage's parameters; as that last backward finishes a parameter's gradient, the hook
starts its all-reduce (async, on the stage's replica group), so the reduction of the later layers'
gradients runs while the backward still computes the earlier ones, as DDP's buckets do. ``S`` then
waits for them (``finish``) before anything reads a gradient: Lightning's clipping and
``on_before_optimizer_step`` see the averaged gradients, as under DDP.

Only the stage's replicas take part: no stage ever waits for another stage here, so PACI keeps no
pipeline-wide synchronisation. The replicas of one stage launch their all-reduces in the order the
autograd engine finishes the parameters, which is the same on every replica (one graph, one
engine); parameters the last backward did not reach are reduced in ``finish``, in parameter order.
The sum is divided by the number of replicas (gloo has no average), so each replica's loss, already a
mean over its micro-batch, becomes the mean over the replicas' samples.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn


class ReplicaGradients:
    """Gradient averaging of one stage's own parameters over ``group`` (``replicas`` ranks)."""

    def __init__(self, params: list[nn.Parameter], group: Any, replicas: int) -> None:
        self.params, self.group, self.replicas = params, group, replicas
        self._armed = False
        self._works: dict[int, Any] = {}  # id(parameter) -> its all-reduce in flight
        self._hooks = [p.register_post_accumulate_grad_hook(self._reduce) for p in params if p.requires_grad]
        self.reductions = 0  # windows averaged, for tests and telemetry

    def start(self) -> None:
        """``R``: the next backward's finished gradients start their all-reduce at once."""
        if self._armed:
            raise RuntimeError("R twice before S: the plan must step each window it all-reduces")
        self._armed, self._works = True, {}

    def _reduce(self, param: nn.Parameter) -> None:
        if self._armed and param.grad is not None:
            self._works[id(param)] = dist.all_reduce(param.grad, group=self.group, async_op=True)

    def finish(self) -> None:
        """Before ``S`` reads the gradients: every all-reduce done, sums turned into means."""
        if not self._armed:
            raise RuntimeError("S without R on a stage with data-parallel replicas: its replicas would step "
                               "on different gradients")
        self._armed = False
        for param in self.params:
            work = self._works.pop(id(param), None)
            if work is None and param.grad is not None:  # not reached by the last backward
                work = dist.all_reduce(param.grad, group=self.group, async_op=True)
            if work is not None:
                work.wait()
                param.grad.div_(self.replicas)
        self.reductions += 1

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
