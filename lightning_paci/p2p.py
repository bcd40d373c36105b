"""Point-to-point traffic between neighbouring stages over torch.distributed (gloo or NCCL).

Activations flow down the pipeline (stage i -> i+1), gradients come back (i+1 -> i) together with
the micro-batch's loss, so every stage learns the loss without a collective. Each direction carries
one kind of message and both ends handle micro-batches in the same order, so FIFO matching suffices.

An activation message is a fixed-size int64 header (count, then dtype code, rank and sizes of each
tensor) followed by the tensors; the receiver checks what arrives against what it expects to
substitute. Gradient messages need no header: their shapes are the sender's own outputs.

Sends are non-blocking; a send is waited for only when too many are outstanding or at a drain,
oldest first. That never deadlocks: the receiver consumes messages in the order they were sent and
needs nothing unsent to reach the oldest one.

Failures: a stage that raises writes a one-line note to the process group's store before it goes
down. A neighbour blocked on it gets gloo's "connection closed" (or the group timeout) and raises a
``PipelineError`` that quotes the note, so the job ends with the failing stage named.
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist
from torch import Tensor

FAILURE_KEY = "lightning_paci/failure"
_HEADER_LEN = 64
_MAX_PENDING_SENDS = 32
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool)


class PipelineError(RuntimeError):
    """A pipeline stage failed, or lost a neighbour; the message names the stage."""


def _store() -> dist.Store | None:
    try:  # the default group's store is private API; failure notes are best effort
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def report_failure(note: str) -> None:
    """Leave the first failure's note where the other stages can read it."""
    store = _store()
    if store is None:
        return
    try:
        if not store.check([FAILURE_KEY]):
            store.set(FAILURE_KEY, note)
    except Exception:
        pass


def failure_note() -> str | None:
    store = _store()
    try:
        if store is not None and store.check([FAILURE_KEY]):
            return store.get(FAILURE_KEY).decode()
    except Exception:
        return None
    return None


class StageLink:
    """The sends and receives of one stage with its neighbours (global ranks ``prev``/``next``)."""

    def __init__(self, stage: int, prev_rank: int | None, next_rank: int | None, device: torch.device,
                 group: dist.ProcessGroup | None = None) -> None:
        self.stage, self.prev_rank, self.next_rank = stage, prev_rank, next_rank
        self.device, self.group = device, group
        self.wait_s = 0.0  # time blocked in receives and send back-pressure (telemetry)
        self._pending: deque[tuple[dist.Work, list[Tensor]]] = deque()

    # -- activations -------------------------------------------------------------------------
    def send_activations(self, tensors: list[Tensor]) -> None:
        header = torch.zeros(_HEADER_LEN, dtype=torch.int64)
        fields = [len(tensors)]
        for t in tensors:
            fields += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
        if len(fields) > _HEADER_LEN:
            raise PipelineError(f"stage {self.stage}: {len(tensors)} tensors cross the stage boundary, "
                                f"more than a {_HEADER_LEN}-field header describes; pass fewer tensors "
                                "between stages or choose other split_points")
        header[: len(fields)] = torch.tensor(fields)
        self._send([header.to(self.device)] + [t.detach().contiguous() for t in tensors], self.next_rank)

    def recv_activations(self) -> list[Tensor]:
        header = self._recv([torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)],
                            self.prev_rank)[0].tolist()
        count, pos, buffers = header[0], 1, []
        for _ in range(count):
            dtype, ndim = _DTYPES[header[pos]], header[pos + 1]
            shape = header[pos + 2: pos + 2 + ndim]
            pos += 2 + ndim
            buffers.append(torch.empty(shape, dtype=dtype, device=self.device))
        return self._recv(buffers, self.prev_rank)

    # -- gradients (+ the micro-batch loss) ---------------------------------------------------
    def send_grads(self, grads: list[Tensor], loss: Tensor) -> None:
        loss = loss.detach().reshape(1).to(device=self.device, dtype=torch.float64)
        self._send([g.contiguous() for g in grads] + [loss], self.prev_rank)

    def recv_grads(self, outputs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        buffers = [torch.empty_like(o) for o in outputs]
        buffers.append(torch.empty(1, dtype=torch.float64, device=self.device))
        received = self._recv(buffers, self.next_rank)
        return received[:-1], received[-1]

    # -- plumbing --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait for every outstanding send (at drains, before anything else may use the peers)."""
        while self._pending:
            self._wait_oldest_send()

    def _send(self, tensors: list[Tensor], peer: int | None) -> None:
        assert peer is not None, f"stage {self.stage} has no neighbour to send to"
        for t in tensors:
            self._pending.append((dist.isend(t, peer, group=self.group), [t]))
        while len(self._pending) > _MAX_PENDING_SENDS:
            self._wait_oldest_send()

    def _recv(self, buffers: list[Tensor], peer: int | None) -> list[Tensor]:
        assert peer is not None, f"stage {self.stage} has no neighbour to receive from"
        works = [dist.irecv(b, peer, group=self.group) for b in buffers]
        for w in works:
            self._wait(w, f"receiving from rank {peer}")
        return buffers

    def _wait_oldest_send(self) -> None:
        work, _ = self._pending.popleft()
        self._wait(work, "sending")

    def _wait(self, work: dist.Work, what: str) -> None:
        start = time.perf_counter()
        try:
            work.wait()
        except Exception as error:
            note = failure_note()
            cause = note or "the neighbour exited or stopped answering (see its own error)"
            raise PipelineError(f"stage {self.stage} lost its pipeline neighbour while {what}: {cause}") from error
        finally:
            self.wait_s += time.perf_counter() - start
