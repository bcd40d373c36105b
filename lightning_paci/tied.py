"""Weights tied across stages (GPT-2's and nanoGPT's ``wte``/``lm_head``), as Megatron's embedding group.

Each stage that uses a tied parameter holds its own real copy: hollow units of other stages are
moved to meta one by one (hollow.py), so the embedding's stage keeps the tensor under the
embedding's name and the head's stage keeps it under the head's name. The copies talk on a process
group of just their stages, created identically on every rank, in partition order.

Flush schedules (``TiedGradients``): before every optimizer step the holders sum their gradients
with ``all_reduce`` and each steps its copy with the same optimizer settings, so the copies stay
equal to one another and to the single tensor of one-process training (the sum is what autograd
accumulates there). Deadlock freedom (NCCL too): every holder runs exactly one S per window in the
same order, and no holder needs anything from another between its window's last backward and its S.

PACI (``TiedCopies``): its stages step at different times (the first stage up to N-1 updates ahead
of the last), so a synchronous reduce would stall the pipeline at every step. Instead the owner (the
first stage holding the parameter) keeps the master copy and the only optimizer state for it. At its
S_w a holder sends its share of window w's gradient to the owner and drops it (its optimizer skips a
parameter without a gradient); the owner adds the shares to its own, steps on the exact sum of
window w, and sends the new weight W_w back. The holder installs W_w at its S_{w+lag} (tiedplan.py).

The bound: a holder's copy lags the owner's by at most ``lag`` steps (its forwards after S_v use the
owner's weight after step v-lag; ``tied_lag_max`` in telemetry). ``lag`` is read off the plan as
the fewest holder steps after which the owner's S_w has happened in every run (it happens-before
through the pipeline's own messages): 1 for PACI with micro_batches >= stages (the first stage runs
only N-1 forwards of window w+1 before its S_w, so the last stage's last forward of window w+1 comes
after it), more with fewer micro-batches or several windows per batch.

Why nothing stalls: the owner's wait for a share finds it sent, since the last stage's backward of
a window's last micro-batch precedes the owner's (the gradient flows down from it) and the holder
sends its share right after; the holder's wait for W_w finds it sent by the choice of ``lag``. The
messages travel on the tied group's own process group in window order on both ends (tiedplan.py
proves it under NCCL's rules), every wait has the group's timeout, and a drain waits for every
weight still owed, so validation, checkpoints and the end of training see equal copies. Memory: a
holder keeps up to ``lag`` received weights and its unsent shares (``tied_buffer_peak_bytes``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_paci.comm import CommOp
from lightning_paci.p2p import PipelineError
from lightning_paci.partition import Partition
from lightning_paci.tiedplan import lower_tied, spec_lag


def check_tied_schedule(partition: Partition, schedule: str) -> None:
    """PACI keeps one tied group's copies bounded-stale (TiedCopies); say what to change for several."""
    if schedule == "paci" and len(partition.tied) > 1:
        groups = "; ".join(" = ".join(f"{name} (stage {s})" for name, s in group) for group in partition.tied)
        raise ValueError(
            f"{len(partition.tied)} groups of weights tied across stages ({groups}): the asynchronous "
            "schedule keeps one such group in step (tied.py); use schedule='1f1b' or 'gpipe', untie all but "
            "one, or pass split_points that keep each group's uses on one stage")


def _groups(partition: Partition, pipelines: list[list[int]], replica: int,
            timeout: timedelta | None) -> list[tuple[list[int], Any]]:
    """(stages, process group) of each tied group of this rank's replica (``pipelines[r]``: the ranks of
    replica r's stages). Every rank creates every replica's groups, in the same order (torch.distributed
    requires it)."""
    out = []
    for r, rank_of in enumerate(pipelines):
        for group in partition.tied:
            stages = sorted({s for _, s in group})
            handle = dist.new_group([rank_of[s] for s in stages], timeout=timeout)
            if r == replica:
                out.append((stages, handle))
    return out


def _name_on(partition: Partition, index: int, stage: int) -> str:
    return next(n for n, s in partition.tied[index] if s == stage)


class TiedGradients:
    """Flush schedules: sums this stage's tied parameters' gradients with the other holders' of its replica
    at S. With data-parallel replicas the runtime averages each stage's gradients over its replicas first,
    so the sum of the averages is the average of the sums: exact, as one process on all replicas' data."""

    handlers: dict[str, Callable[[Any], None]] = {}

    def __init__(self, model: nn.Module, partition: Partition, stage: int, pipelines: list[list[int]],
                 replica: int = 0, timeout: timedelta | None = None) -> None:
        self.reductions: list[tuple[nn.Parameter, object]] = []
        for index, (stages, handle) in enumerate(_groups(partition, pipelines, replica, timeout)):
            if stage in stages:
                self.reductions.append((model.get_parameter(_name_on(partition, index, stage)), handle))

    def __call__(self) -> None:
        for param, group in self.reductions:
            if param.grad is None:  # this stage's use got no gradient in the window: its share is zero
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=group)

    def lower(self, program: Sequence[Any], version: int, drain: bool) -> Sequence[Any]:
        return program  # the all-reduce is a collective inside S, not a message of the program

    def wait_sends(self) -> None:
        pass

    def drained(self, version: int) -> None:
        pass

    def telemetry(self) -> dict[str, Any]:
        return {}


class TiedCopies:
    """PACI: the owner steps the tied weight on the summed gradient, holders keep bounded-stale copies.

    Runs the tied operations ``tiedplan.lower_tied`` puts around each S (module docstring); ``spec``
    is the runtime's PlanSpec, from whose plan the lag is read.
    """

    def __init__(self, model: nn.Module, partition: Partition, stage: int, rank_of: list[int], spec: Any,
                 timeout: timedelta | None = None) -> None:
        check_tied_schedule(partition, "paci")
        (stages, self.group), = _groups(partition, [rank_of], 0, timeout)
        self.stage, self.rank_of, self.timeout = stage, rank_of, timeout
        self.owner, self.holders = stages[0], stages[1:]
        self.lag = spec_lag(spec, self.owner, self.holders)  # proves the messages deadlock-free too
        self.name = _name_on(partition, 0, stage) if stage in stages else None
        self.param = model.get_parameter(self.name) if self.name is not None else None
        # gloo moves host tensors only: on a CUDA device (stages sharing one GPU) messages go through the host
        staged = self.param is not None and self.param.is_cuda and dist.get_backend(self.group) == "gloo"
        self._wire = torch.device("cpu") if staged else None
        self.since: int | None = None  # steps at the last drain: no weight was asked for before it
        self.copy_version = 0  # owner steps in this holder's copy
        self.lag_max = self.lag_last = 0
        self._grads_in: dict[tuple[int, int], tuple[Any, Tensor]] = {}
        self._weights_in: dict[int, tuple[Any, Tensor]] = {}
        self._grad_sends: list[tuple[Any, Tensor]] = []
        self._weight_sends: list[tuple[Any, Tensor]] = []
        self.buffer_peak_bytes = 0
        self.handlers = {"sT": self._send_grad, "rT": self._post_grad, "wT": self._wait_grad,
                         "sU": self._send_weight, "rU": self._post_weight, "wU": self._wait_weight,
                         "WU": lambda _: self._wait_all(self._weight_sends, "sending the tied weight")}

    def __call__(self) -> None:
        pass  # the shares were added by wT before S (the runtime's guard checks the sum at S)

    def lower(self, program: Sequence[Any], version: int, drain: bool) -> Sequence[Any]:
        if self.since is None:  # the first program (after a resume too): every copy is the owner's
            self.since = self.copy_version = version
        return lower_tied(program, self.stage, self.owner, self.holders, self.lag, version, self.since, drain)

    def drained(self, version: int) -> None:
        """After a drain every weight owed was installed: the copies equal the owner's."""
        assert not self._weights_in and not self._grads_in, "tied weights: messages left at a drain"
        self.since = version
        if self.param is not None and self.stage != self.owner:
            self.copy_version = version

    def wait_sends(self) -> None:
        self._wait_all(self._grad_sends, "sending its tied gradient share")
        self._wait_all(self._weight_sends, "sending the tied weight")

    def telemetry(self) -> dict[str, Any]:
        if self.param is None:
            return {}
        return {"tied_lag_bound": self.lag, "tied_lag_max": self.lag_max, "tied_lag_last": self.lag_last,
                "tied_buffer_peak_bytes": self.buffer_peak_bytes}

    # -- the operations (peers are stages; the group's ranks are global ranks) ---------------------------
    def _send_grad(self, op: CommOp) -> None:
        grad = (self.param.grad if self.param.grad is not None else torch.zeros_like(self.param)).contiguous()
        self.param.grad = None  # the holder's optimizer skips its copy: the owner steps the tied weight
        self._grad_sends = [(w, t) for w, t in self._grad_sends if not w.is_completed()]
        grad = grad.to(self._wire) if self._wire is not None else grad
        self._grad_sends.append((dist.isend(grad, self.rank_of[op.peer], group=self.group), grad))
        self._held()

    def _post_grad(self, op: CommOp) -> None:
        buffer = torch.empty_like(self.param, device=self._wire)
        self._grads_in[op.micro_batch, op.peer] = (dist.irecv(buffer, self.rank_of[op.peer], group=self.group),
                                                   buffer)
        self._held()

    def _wait_grad(self, op: CommOp) -> None:
        work, share = self._grads_in.pop((op.micro_batch, op.peer))
        self._wait(work, f"receiving stage {op.peer}'s tied gradient share of window {op.micro_batch}")
        share = share.to(self.param.device)
        if self.param.grad is None:
            self.param.grad = share
        else:
            self.param.grad.add_(share)

    def _send_weight(self, op: CommOp) -> None:
        weight = self.param.detach()  # not written before the next S, whose WU waits for this send first
        weight = weight.to(self._wire) if self._wire is not None else weight
        self._weight_sends.append((dist.isend(weight, self.rank_of[op.peer], group=self.group), weight))

    def _post_weight(self, op: CommOp) -> None:
        buffer = torch.empty_like(self.param, device=self._wire)
        self._weights_in[op.micro_batch] = (dist.irecv(buffer, self.rank_of[op.peer], group=self.group), buffer)
        self._held()
        # right after S_w: this stage's forwards from now on use the owner's weight after its step copy_version-1
        self.lag_last = op.micro_batch + 1 - self.copy_version
        self.lag_max = max(self.lag_max, self.lag_last)

    def _wait_weight(self, op: CommOp) -> None:
        work, weight = self._weights_in.pop(op.micro_batch)
        self._wait(work, f"receiving the tied weight after stage {op.peer}'s step {op.micro_batch}")
        # In place on the data, as the optimizer's aliases write (runtime.py, stale weights): a backward
        # in flight reads the new weight instead of failing on a version counter.
        self.param.data.copy_(weight)
        self.copy_version = op.micro_batch + 1

    def _held(self) -> None:
        tensors = [t for _, t in self._grad_sends] + [t for _, t in self._grads_in.values()]
        tensors += [t for _, t in self._weights_in.values()]
        self.buffer_peak_bytes = max(self.buffer_peak_bytes, sum(t.numel() * t.element_size() for t in tensors))

    def _wait_all(self, works: list[tuple[Any, Tensor]], what: str) -> None:
        while works:
            self._wait(works.pop(0)[0], what)

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait(self.timeout) if self.timeout is not None else work.wait()
        except Exception as error:
            stages = [self.owner, *self.holders]
            raise PipelineError(f"stage {self.stage} ({self.name}, tied across stages {stages}) failed "
                                f"{what}: {type(error).__name__}: {error}") from error
