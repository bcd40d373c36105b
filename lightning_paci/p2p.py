"""Point-to-point traffic between neighbouring stages over torch.distributed (gloo or NCCL).

Activations flow down the pipeline (stage i -> i+1), gradients come back (i+1 -> i) together with
the micro-batch's loss, so every stage learns the loss without a collective. Each direction carries
one kind of message on a process group of its own (``boundary_groups``) and both ends handle
micro-batches in the same order, so FIFO matching suffices, under gloo's per-message matching and
under NCCL's one stream per group and rank pair alike (comm.py models both and proves every plan's
order of posts deadlock-free; on one shared group NCCL would deadlock at the first backward).

An activation message is a fixed-size int64 header (count, then dtype code, rank and sizes of each
tensor) followed by the tensors; the receiver checks what arrives against what it expects to
substitute. Gradient messages need no header: their shapes are the sender's own outputs.

Sticky shapes: gloo moves a message only once both ends have posted it, and on busy cores each
such rendezvous costs milliseconds (the other side's I/O thread has to be scheduled). So the
receiver posts the header *and* the tensors at once, shaped like the previous message. Both ends
remember the previous header; when the shapes change, the sender first fills the receiver's
guess with placeholder tensors of the old shapes, then sends the message again, which the
receiver (seeing a new header) receives with the right shapes. The first message of a link is
received header first.

Receives are posted early where the order of messages makes it safe: the receive of the next
activation message as soon as a forward has its input and another forward of the batch follows, and the
receive of a forward's gradients right after its activations are sent (every forward's backward
runs before the next drain ends, in forward order). gloo then moves the message while this stage
computes instead of when it asks for it; on the 2-core benchmark this raised PACI's utilization
from 0.89 to 0.93-0.95 per stage.

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
from datetime import timedelta
from typing import Any

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


def _silent_neighbour(error: Exception, timeout_s: float | None) -> str:
    """What a failed wait means when no stage left a failure note."""
    if "timed out" in str(error).lower() or "timeout" in str(error).lower():
        limit = f"{timeout_s:g} s (timeout_s)" if timeout_s is not None else "the process group's timeout"
        return (f"the neighbour stopped answering: nothing came for {limit}. It raised no error of its own: "
                "it is stuck (a hang in its step, a deadlock, a stalled device) or was stopped; the job ends "
                "and its stage processes are ended with it")
    return ("the neighbour's process ended without leaving a failure note (killed, or it exited); "
            f"its own output says why ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})")


def boundary_groups(rank_of_stage: list[int], timeout: timedelta | None = None) -> list[tuple[Any, Any]]:
    """``(activations, gradients)`` process groups of every stage boundary (stage b -> b+1).

    A collective: every rank creates every group, in the same order, as torch.distributed requires
    (ranks outside a group get a non-member placeholder). Each direction has a group of its own
    because ProcessGroupNCCL runs all operations of one group between two ranks on one stream, in
    posted order, for both directions: a gradient receive posted early would block the activation
    send queued behind it while the peer waits for that activation (comm.py proves both models).
    """
    return [tuple(dist.new_group([rank_of_stage[b], rank_of_stage[b + 1]], timeout=timeout) for _ in range(2))
            for b in range(len(rank_of_stage) - 1)]


class StageLink:
    """The sends and receives of one stage with its neighbours (global ranks ``prev``/``next``).

    ``groups`` are ``boundary_groups``' result (None: the default group carries everything, which is
    safe on gloo only).
    """

    def __init__(self, stage: int, prev_rank: int | None, next_rank: int | None, device: torch.device,
                 groups: list[tuple[Any, Any]] | None = None, timeout_s: float | None = None) -> None:
        self.stage, self.prev_rank, self.next_rank = stage, prev_rank, next_rank
        self.timeout_s = timeout_s
        self.device = device
        # (activations, gradients) groups of the boundary in front of this stage and of the one after it
        self._prev_groups = groups[stage - 1] if groups and prev_rank is not None else (None, None)
        self._next_groups = groups[stage] if groups and next_rank is not None else (None, None)
        self.wait_s = 0.0  # time blocked in receives and send back-pressure (telemetry)
        # (start, end, "recv"|"send") of every wait, kept only while a timeline is recorded
        self.wait_log: list[tuple[float, float, str]] | None = None
        self._pending: deque[tuple[dist.Work, list[Tensor]]] = deque()
        self._sent_header: list[int] | None = None  # the last activation header each way (sticky shapes)
        self._received_header: list[int] | None = None
        # Receives posted before the action that needs them (expect_activations / expect_grads).
        self._early_activations: tuple[Tensor, list[Tensor], list[dist.Work]] | None = None
        self._early_grads: deque[tuple[list[Tensor], list[dist.Work]]] = deque()

    # -- activations -------------------------------------------------------------------------
    def send_activations(self, tensors: list[Tensor]) -> None:
        fields = [len(tensors)]
        for t in tensors:
            fields += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
        if len(fields) > _HEADER_LEN:
            raise PipelineError(f"stage {self.stage}: {len(tensors)} tensors cross the stage boundary, "
                                f"more than a {_HEADER_LEN}-field header describes; pass fewer tensors "
                                "between stages or choose other split_points")
        fields += [0] * (_HEADER_LEN - len(fields))
        header = torch.tensor(fields, dtype=torch.int64, device=self.device)
        if self._sent_header is not None and fields != self._sent_header:
            self._send([header] + self._empty(self._sent_header), self.next_rank,
                       self._next_groups[0])  # fills the receiver's guess
        self._sent_header = fields
        self._send([header] + [t.detach().contiguous() for t in tensors], self.next_rank, self._next_groups[0])

    def expect_activations(self) -> None:
        """Post the next activation message's receive now, shaped like the last one, so that gloo
        moves it while this stage computes. Only for a message that surely comes before the next
        drain (the runtime posts one while another forward of the same batch follows)."""
        if self._early_activations is None:
            header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
            guess = self._empty(self._received_header) if self._received_header is not None else []
            self._early_activations = (header, guess, self._post([header] + guess, self.prev_rank,
                                                                 self._prev_groups[0]))

    def recv_activations(self) -> list[Tensor]:
        self.expect_activations()
        (header, guess, works), self._early_activations = self._early_activations, None
        self._wait_all(works, self.prev_rank)
        fields = header.tolist()
        if fields == self._received_header:
            return guess
        # The link's first message, or new shapes (then `guess` got placeholders and the message follows).
        again = [header] if self._received_header is not None else []
        self._received_header, buffers = fields, self._empty(fields)
        self._recv(again + buffers, self.prev_rank, self._prev_groups[0])
        return buffers

    def _empty(self, fields: list[int]) -> list[Tensor]:
        """Uninitialised tensors of the dtypes and shapes a header describes."""
        count, pos, out = fields[0], 1, []
        for _ in range(count):
            dtype, ndim = _DTYPES[fields[pos]], fields[pos + 1]
            out.append(torch.empty(fields[pos + 2: pos + 2 + ndim], dtype=dtype, device=self.device))
            pos += 2 + ndim
        return out

    # -- gradients (+ the micro-batch loss) ---------------------------------------------------
    def send_grads(self, grads: list[Tensor], loss: Tensor) -> None:
        loss = loss.detach().reshape(1).to(device=self.device, dtype=torch.float64)
        self._send([g.contiguous() for g in grads] + [loss], self.prev_rank, self._prev_groups[1])

    def expect_grads(self, outputs: list[Tensor]) -> None:
        """Post the receive of the gradients for ``outputs`` (just sent on) now. Backwards run in
        forward order and every forward's backward runs before a drain ends, so ``recv_grads``
        takes these in FIFO order and none is left posted."""
        buffers = [torch.empty_like(o) for o in outputs]
        buffers.append(torch.empty(1, dtype=torch.float64, device=self.device))
        self._early_grads.append((buffers, self._post(buffers, self.next_rank, self._next_groups[1])))

    def recv_grads(self, outputs: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        if not self._early_grads:
            self.expect_grads(outputs)
        buffers, works = self._early_grads.popleft()
        self._wait_all(works, self.next_rank)
        return buffers[:-1], buffers[-1]

    # -- plumbing --------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait for every outstanding send (at drains, before anything else may use the peers)."""
        while self._pending:
            self._wait_oldest_send()

    def _send(self, tensors: list[Tensor], peer: int | None, group: Any) -> None:
        assert peer is not None, f"stage {self.stage} has no neighbour to send to"
        for t in tensors:
            self._pending.append((dist.isend(t, peer, group=group), [t]))
        while len(self._pending) > _MAX_PENDING_SENDS:
            self._wait_oldest_send()

    def _post(self, buffers: list[Tensor], peer: int | None, group: Any) -> list[dist.Work]:
        assert peer is not None, f"stage {self.stage} has no neighbour to receive from"
        return [dist.irecv(b, peer, group=group) for b in buffers]

    def _recv(self, buffers: list[Tensor], peer: int | None, group: Any) -> list[Tensor]:
        self._wait_all(self._post(buffers, peer, group), peer)
        return buffers

    def _wait_all(self, works: list[dist.Work], peer: int | None) -> None:
        for w in works:
            self._wait(w, f"receiving from rank {peer}", "recv")

    def _wait_oldest_send(self) -> None:
        work, _ = self._pending.popleft()
        self._wait(work, "sending", "send")

    def _wait(self, work: dist.Work, what: str, kind: str) -> None:
        start = time.perf_counter()
        try:
            work.wait()
        except Exception as error:
            cause = failure_note() or _silent_neighbour(error, self.timeout_s)
            raise PipelineError(f"stage {self.stage} lost its pipeline neighbour while {what}: {cause}") from error
        finally:
            end = time.perf_counter()
            self.wait_s += end - start
            if self.wait_log is not None:
                self.wait_log.append((start, end, kind))
