"""Point-to-point traffic between neighbouring stages over torch.distributed (gloo or NCCL).

Activations flow down the pipeline (stage i -> i+1), gradients come back (i+1 -> i) together with
the micro-batch's loss and the window's non-finite flag (nonfinite.py), so every stage learns both
without a collective. Each direction carries one kind of message on a process group of its own
(``boundary_groups``) and both ends handle micro-batches in the same order, so FIFO matching
suffices, under gloo's per-message matching and under NCCL's one stream per group and rank pair
alike (comm.py models both and proves every plan's order of posts deadlock-free; on one shared
group NCCL would deadlock at the first backward).

An activation message is a fixed-size int64 header (count, then dtype code, requires_grad, rank and
sizes of each tensor) followed by the tensors and the micro-batch's fingerprint (inputs.py: a
fixed-size float64 tensor the header does not describe, so it never changes the sticky shapes); the
receiver checks what arrives against what it expects to substitute. Only tensors that require grad
on the sender get one on the receiver, and only those get a gradient back (an attention mask or a
RoPE table crosses the boundary without one). Gradient messages need no header: their shapes are
the sender's own outputs, received into contiguous buffers (``empty_like`` would keep an output's
strides, and NCCL writes the sender's contiguous bytes). Headers live on the host: on CUDA they
travel over a gloo group of their own, so reading one never waits for the device.

Sticky shapes: gloo moves a message only once both ends have posted it, and on busy cores each
such rendezvous costs milliseconds (the other side's I/O thread has to be scheduled). So the
receiver posts the header *and* the tensors at once, shaped like the previous message. Both ends
remember the previous header; when the shapes change, the sender first fills the receiver's
guess with placeholder tensors of the old shapes, then sends the message again, which the
receiver (seeing a new header) receives with the right shapes. The first message of a link is
received header first.

This class decides nothing about when messages move: the runtime executes the stage's program (comm.lower)
and calls one primitive per operation: ``post_activations``/``wait_activations``/``send_activations``
(rA/wA/sA), ``post_grads``/``wait_grads``/``send_grads`` (rG/wG/sG) and ``wait_sends`` (W); each
carries the micro-batch it is for, and a wait for another micro-batch than the oldest posted
receive fails. The program posts receives early where the order of messages makes it safe: the
next activation receive of a batch as soon as the current one arrived, a gradient receive right
after its activations were sent. gloo then moves the message while this stage computes instead of
when it asks for it; on the 2-core benchmark this raised PACI's utilization from 0.89 to 0.93-0.95
per stage.

Sends are non-blocking; a send is waited for only when too many are outstanding or at a drain,
oldest first. That never deadlocks: the receiver consumes messages in the order they were sent and
needs nothing unsent to reach the oldest one.

Failures: a stage that raises writes a one-line note to the process group's store before it goes
down. A neighbour blocked on it gets gloo's "connection closed" (or the group timeout) and raises a
``PipelineError`` that quotes the note, so the job ends with the failing stage named.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_paci.clock import CudaEventClock, HostClock
from lightning_paci.comm import ACTIVATION, GRADIENT, POST_RECV, SEND, WAIT, WAIT_SENDS, CommOp
from lightning_paci.inputs import FINGERPRINT_LEN

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


_reported_here = False


def report_failure(note: str) -> None:
    """Leave the first failure's note where the other stages can read it."""
    global _reported_here
    _reported_here = True
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


class FailureWatch(threading.Thread):
    """Ends this stage process when another stage has failed and this one has not stopped by itself.

    On gloo a stage blocked on a failed neighbour gets an error at once. On NCCL a ``wait()`` only
    makes the stream wait: the host then blocks in its next device sync, possibly until NCCL's
    watchdog aborts the process without naming anyone; and a stage busy in its own compute notices
    nothing on either transport. This thread reads the failure note every ``poll_s``; once one
    appears that this process did not write, it gives the process ``grace_s`` to fail by itself,
    then prints the note and exits with status 1.
    """

    def __init__(self, stage: int, grace_s: float = 5.0, poll_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="lightning_paci-failure-watch")
        self.stage, self.grace_s, self.poll_s = stage, grace_s, poll_s
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.poll_s):
            note = failure_note()
            if note is None or _reported_here:
                continue
            if self.done.wait(self.grace_s):
                return
            print(f"lightning_paci: stage {self.stage} ends because another stage failed {self.grace_s:.0f} s "
                  f"ago and this one did not stop by itself: {note}", file=sys.stderr, flush=True)
            os._exit(1)


def _silent_neighbour(error: Exception, timeout_s: float | None) -> str:
    """What a failed wait means when no stage left a failure note."""
    if "timed out" in str(error).lower() or "timeout" in str(error).lower():
        limit = f"{timeout_s:g} s (timeout_s)" if timeout_s is not None else "the process group's timeout"
        return (f"the neighbour stopped answering: nothing came for {limit}. It raised no error of its own: "
                "it is stuck (a hang in its step, a deadlock, a stalled device) or was stopped; the job ends "
                "and its stage processes are ended with it")
    return ("the neighbour's process ended without leaving a failure note (killed, or it exited); "
            f"its own output says why ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]})")


def boundary_groups(rank_of_stage: list[int], timeout: timedelta | None = None,
                    host_headers: bool = False) -> list[tuple[Any, Any, Any]]:
    """``(activations, gradients, headers)`` process groups of every stage boundary (stage b -> b+1).

    A collective: every rank creates every group, in the same order, as torch.distributed requires
    (ranks outside a group get a non-member placeholder). Each direction has a group of its own
    because ProcessGroupNCCL runs all operations of one group between two ranks on one stream, in
    posted order, for both directions: a gradient receive posted early would block the activation
    send queued behind it while the peer waits for that activation (comm.py proves both models).
    With ``host_headers`` (the default backend is NCCL) activation headers get a gloo group of their
    own; otherwise they travel on the activation group.
    """
    groups = []
    for b in range(len(rank_of_stage) - 1):
        pair = [rank_of_stage[b], rank_of_stage[b + 1]]
        activations, gradients = (dist.new_group(pair, timeout=timeout) for _ in range(2))
        headers = dist.new_group(pair, timeout=timeout, backend="gloo") if host_headers else activations
        groups.append((activations, gradients, headers))
    return groups


class StageLink:
    """The sends and receives of one stage with its neighbours (global ranks ``prev``/``next``).

    ``groups`` are ``boundary_groups``' result (None: the default group carries everything, which is
    safe on gloo only). ``staged``: the transport takes host tensors only (gloo with a CUDA device):
    tensors go through host memory on both ends.
    """

    def __init__(self, stage: int, prev_rank: int | None, next_rank: int | None, device: torch.device,
                 groups: list[tuple[Any, Any, Any]] | None = None, staged: bool = False,
                 timeout_s: float | None = None) -> None:
        self.stage, self.prev_rank, self.next_rank = stage, prev_rank, next_rank
        self.timeout_s = timeout_s
        self.device = device
        self._wire = torch.device("cpu") if staged else device  # where message tensors live
        # (activations, gradients, headers) groups of the boundary in front of this stage and after it
        self._prev_groups = groups[stage - 1] if groups and prev_rank is not None else (None, None, None)
        self._next_groups = groups[stage] if groups and next_rank is not None else (None, None, None)
        # headers on the host wherever they have a group of their own (or the device is the host)
        host = self._wire.type == "cpu" or (groups and groups[0][2] is not groups[0][0])
        self._header_device = torch.device("cpu") if host else device
        # (start, end, "recv"|"send") clock marks of every wait in receives and send back-pressure, until
        # the runtime takes them (telemetry, timeline; see clock.py)
        self.clock: HostClock | CudaEventClock = HostClock()
        self.waits: list[tuple[Any, Any, str]] = []
        # Every operation this link carried out, in order, when a list is given (tests compare it with
        # comm.lower of the plan that ran).
        self.trace: list[Any] | None = None
        self._pending: deque[tuple[dist.Work, list[Tensor]]] = deque()
        self._sent_header: list[int] | None = None  # the last activation header each way (sticky shapes)
        self._received_header: list[int] | None = None
        # Posted receives not yet waited for, oldest first: (micro-batch, header, guess + fingerprint, works)
        # and (micro-batch, buffers, works).
        self._activation_recvs: deque[tuple[int, Tensor, list[Tensor], list[dist.Work]]] = deque()
        self._grad_recvs: deque[tuple[int, list[Tensor], list[dist.Work]]] = deque()

    def _traced(self, verb: str, kind: str | None = None, micro_batch: int | None = None) -> None:
        if self.trace is not None:
            self.trace.append(CommOp(verb, kind, micro_batch))

    # -- activations (A) ----------------------------------------------------------------------
    def send_activations(self, micro_batch: int, tensors: list[Tensor], fingerprint: Tensor) -> None:
        """``sA j``: post the send of micro-batch j's boundary tensors and its fingerprint."""
        self._traced(SEND, ACTIVATION, micro_batch)
        fields = [len(tensors)]
        for t in tensors:
            fields += [_DTYPES.index(t.dtype), int(t.requires_grad), t.dim(), *t.shape]
        if len(fields) > _HEADER_LEN:
            raise PipelineError(f"stage {self.stage}: {len(tensors)} tensors cross the stage boundary, "
                                f"more than a {_HEADER_LEN}-field header describes; pass fewer tensors "
                                "between stages or choose other split_points")
        fields += [0] * (_HEADER_LEN - len(fields))
        header = torch.tensor(fields, dtype=torch.int64, device=self._header_device)
        if self._sent_header is not None and fields != self._sent_header:
            self._send_message(header, self._empty(self._sent_header))  # fills the receiver's guess
        self._sent_header = fields
        self._send_message(header, [t.detach().to(self._wire).contiguous() for t in tensors]
                           + [fingerprint.to(self._wire)])

    def _send_message(self, header: Tensor, tensors: list[Tensor]) -> None:
        activations, _, headers = self._next_groups
        if headers is activations:
            self._send([header] + tensors, self.next_rank, activations)
        else:
            self._send([header], self.next_rank, headers)
            self._send(tensors, self.next_rank, activations)

    def post_activations(self, micro_batch: int) -> None:
        """``rA j``: post the receive of micro-batch j's activations, shaped like the last message, so
        that the transport moves it while this stage computes. One at a time: a message with new shapes
        arrives as a placeholder and then again (sticky shapes), which a second posted receive would
        swallow."""
        self._traced(POST_RECV, ACTIVATION, micro_batch)
        if self._activation_recvs:
            waiting = self._activation_recvs[0][0]
            raise PipelineError(f"stage {self.stage}: rA{micro_batch} posted while rA{waiting} still waits; the "
                                "program must wait for one activation message before posting the next")
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self._header_device)
        guess = self._empty(self._received_header) if self._received_header is not None else []
        self._activation_recvs.append((micro_batch, header, guess, self._post_message(header, guess)))

    def _post_message(self, header: Tensor | None, tensors: list[Tensor]) -> list[dist.Work]:
        activations, _, headers = self._prev_groups
        if header is None:
            return self._post(tensors, self.prev_rank, activations)
        if headers is activations:
            return self._post([header] + tensors, self.prev_rank, activations)
        return self._post([header], self.prev_rank, headers) + self._post(tensors, self.prev_rank, activations)

    def wait_activations(self, micro_batch: int) -> tuple[list[Tensor], Tensor]:
        """``wA j``: micro-batch j's activations (posted by ``post_activations``) and its fingerprint."""
        self._traced(WAIT, ACTIVATION, micro_batch)
        j, header, guess, works = self._oldest(self._activation_recvs, ACTIVATION, micro_batch)
        self._wait_all(works, self.prev_rank)
        fields = header.tolist()  # a host tensor: no device sync
        if fields != self._received_header:
            # The link's first message, or new shapes (`guess` got placeholders and the message follows):
            # the rest of this one message, on the activation group, where nothing else is queued.
            again = header if self._received_header is not None else None
            self._received_header, guess = fields, self._empty(fields)
            self._wait_all(self._post_message(again, guess), self.prev_rank)
        # Leaves that require grad as the sender's tensors did: the backward stops here, .grad goes back.
        *arrived, fingerprint = self._arrive(guess)
        for t, requires_grad in zip(arrived, self._requires_grad(fields)):
            t.requires_grad_(requires_grad)
        return arrived, fingerprint

    def _oldest(self, posted: deque, kind: str, micro_batch: int) -> tuple:
        if not posted or posted[0][0] != micro_batch:
            head = f"{kind}{posted[0][0]}" if posted else "none"
            raise PipelineError(f"stage {self.stage}: w{kind}{micro_batch} without its receive posted (oldest "
                                f"posted: {head}); messages match in posted order, so every wait needs its "
                                f"r{kind} first, in micro-batch order")
        return posted.popleft()

    def _arrive(self, tensors: list[Tensor]) -> list[Tensor]:
        return tensors if self._wire == self.device else [t.to(self.device) for t in tensors]

    def _empty(self, fields: list[int]) -> list[Tensor]:
        """Uninitialised tensors of the dtypes and shapes a header describes, then the fingerprint's."""
        count, pos, out = fields[0], 1, []
        for _ in range(count):
            dtype, ndim = _DTYPES[fields[pos]], fields[pos + 2]
            out.append(torch.empty(fields[pos + 3: pos + 3 + ndim], dtype=dtype, device=self._wire))
            pos += 3 + ndim
        out.append(torch.empty(FINGERPRINT_LEN, dtype=torch.float64, device=self._wire))
        return out

    @staticmethod
    def _requires_grad(fields: list[int]) -> list[bool]:
        count, pos, out = fields[0], 1, []
        for _ in range(count):
            out.append(bool(fields[pos + 1]))
            pos += 3 + fields[pos + 2]
        return out

    # -- gradients (G), with the micro-batch loss and the window's non-finite flag ----------------
    def send_grads(self, micro_batch: int, grads: list[Tensor], loss: Tensor, nonfinite: Tensor) -> None:
        """``sG j``: post the send of micro-batch j's input gradients, its loss and ``nonfinite`` (whether
        the window of j must be skipped, see the runtime's skip_nonfinite_windows) in one message."""
        self._traced(SEND, GRADIENT, micro_batch)
        tail = torch.stack([loss.detach().reshape(()), nonfinite.reshape(())]).to(self._wire, torch.float64)
        self._send([g.to(self._wire).contiguous() for g in grads] + [tail], self.prev_rank, self._prev_groups[1])

    def post_grads(self, micro_batch: int, outputs: list[Tensor]) -> None:
        """``rG j``: post the receive of the gradients for ``outputs`` (micro-batch j's, sent on), into
        contiguous buffers."""
        self._traced(POST_RECV, GRADIENT, micro_batch)
        buffers = [torch.empty(o.shape, dtype=o.dtype, device=self._wire) for o in outputs]  # contiguous
        buffers.append(torch.empty(2, dtype=torch.float64, device=self._wire))
        self._grad_recvs.append((micro_batch, buffers, self._post(buffers, self.next_rank, self._next_groups[1])))

    def wait_grads(self, micro_batch: int) -> tuple[list[Tensor], Tensor, Tensor]:
        """``wG j``: micro-batch j's output gradients, its loss and the non-finite flag (0-d tensors)."""
        self._traced(WAIT, GRADIENT, micro_batch)
        _, buffers, works = self._oldest(self._grad_recvs, GRADIENT, micro_batch)
        self._wait_all(works, self.next_rank)
        *grads, tail = self._arrive(buffers)
        return grads, tail[0], tail[1]

    # -- plumbing --------------------------------------------------------------------------------
    def wait_sends(self) -> None:
        """``W``: wait for every outstanding send (at drains, before anything else may use the peers)."""
        self._traced(WAIT_SENDS)
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

    def _wait_all(self, works: list[dist.Work], peer: int | None) -> None:
        for w in works:
            self._wait(w, f"receiving from rank {peer}", "recv")

    def _wait_oldest_send(self) -> None:
        work, _ = self._pending.popleft()
        self._wait(work, "sending", "send")

    def take_waits(self) -> list[tuple[Any, Any, str]]:
        waits, self.waits = self.waits, []
        return waits

    def _wait(self, work: dist.Work, what: str, kind: str) -> None:
        start = self.clock.mark()
        try:
            work.wait()
        except Exception as error:
            note = failure_note()
            message = (f"stage {self.stage} lost its pipeline neighbour while {what}: "
                       f"{note or _silent_neighbour(error, self.timeout_s)}")
            if note is None:  # the first to know: stages busy elsewhere learn it from the note (FailureWatch)
                report_failure(message)
            raise PipelineError(message) from error
        finally:
            self.waits.append((start, self.clock.mark(), kind))
