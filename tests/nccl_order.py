"""NCCL's ordering rules for point-to-point operations, emulated over gloo on CPU.

ProcessGroupNCCL runs every send and receive of one process group between two ranks on one stream,
for both directions, in the order they were posted, and each completes only once its match on the
peer runs. ``install()`` makes ``torch.distributed.isend``/``irecv`` behave that way: each operation
goes to a worker thread of its (process group, rank pair), which runs the real gloo operation to
completion before it starts the next (gloo's send itself waits until the receiver has posted its
receive, as NCCL's does). A posting order that would hang on NCCL then hangs here too, and
``Work.wait`` raises after ``timeout_s`` naming the operation it waited for.

Only the tests use this; the runtime calls ``isend``/``irecv`` (never ``batch_isend_irecv``, which
``install`` therefore refuses rather than emulating NCCL's group semantics).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

import torch.distributed as dist


class _Work:
    """What the emulated ``isend``/``irecv`` return: completes when its pair's worker ran it."""

    def __init__(self, what: str, timeout_s: float) -> None:
        self.what, self.timeout_s = what, timeout_s
        self._done = threading.Event()
        self._error: BaseException | None = None

    def wait(self, timeout: Any = None) -> bool:
        if not self._done.wait(self.timeout_s):
            raise RuntimeError(f"emulated NCCL order: {self.what} did not complete in {self.timeout_s:.0f} s "
                               "(operations of one process group and rank pair run one at a time, "
                               "in posted order)")
        if self._error is not None:
            raise RuntimeError(f"emulated NCCL order: {self.what} failed") from self._error
        return True

    def is_completed(self) -> bool:
        return self._done.is_set()


class _PairStreams:
    def __init__(self, isend: Callable, irecv: Callable, timeout_s: float) -> None:
        self.isend, self.irecv, self.timeout_s = isend, irecv, timeout_s
        self.queues: dict[tuple, queue.SimpleQueue] = {}
        self.lock = threading.Lock()
        self.posted: list[str] = []  # every operation in posted order, for tests that check it

    def submit(self, op: Callable, tensor: Any, peer: int, group: Any, verb: str) -> _Work:
        me = dist.get_rank()
        key = (id(group) if group is not None else None, min(me, peer), max(me, peer))
        direction = "to" if verb == "send" else "from"
        work = _Work(f"{verb} {tuple(tensor.shape)} {direction} rank {peer}", self.timeout_s)
        with self.lock:
            self.posted.append(work.what)
            if key not in self.queues:
                self.queues[key] = queue.SimpleQueue()
                threading.Thread(target=self._run, args=(self.queues[key],), daemon=True,
                                 name=f"nccl-order-{key[1]}-{key[2]}").start()
            self.queues[key].put((op, tensor, peer, group, work))
        return work

    @staticmethod
    def _run(ops: queue.SimpleQueue) -> None:
        while True:
            op, tensor, peer, group, work = ops.get()
            try:
                op(tensor, peer, group=group).wait()
            except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
                work._error = error
            work._done.set()


def install(timeout_s: float = 60.0) -> _PairStreams:
    """Patch torch.distributed's isend/irecv in this process; returns the emulator (its ``posted`` log)."""
    streams = _PairStreams(dist.isend, dist.irecv, timeout_s)

    def isend(tensor: Any, dst: int, group: Any = None, tag: int = 0, **kwargs: Any) -> _Work:
        return streams.submit(streams.isend, tensor, dst, group, "send")

    def irecv(tensor: Any, src: int | None = None, group: Any = None, tag: int = 0, **kwargs: Any) -> _Work:
        if src is None:
            raise ValueError("emulated NCCL order: NCCL has no receive from any source")
        return streams.submit(streams.irecv, tensor, src, group, "recv")

    def batch_isend_irecv(p2p_op_list: list) -> list:
        raise NotImplementedError("emulated NCCL order: batch_isend_irecv is not emulated")

    dist.isend, dist.irecv, dist.batch_isend_irecv = isend, irecv, batch_isend_irecv
    return streams
