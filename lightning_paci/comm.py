"""The messages a plan implies, and a proof that they cannot deadlock under gloo's or NCCL's rules.

``lower`` turns one stage's actions into the ordered program its process runs: the compute actions
F/B/S with the point-to-point operations between them, in the order they are posted. The runtime
executes exactly this program (runtime.StageRuntime._run, one handler per action and operation), so
what ``check_transport`` proves is what runs. Two messages
cross each stage boundary per micro-batch: ``A`` (activations, stage i -> i+1) and ``G`` (its
gradient with the loss, i+1 -> i). Operations print compactly and parse back::

    rA3  post the receive of micro-batch 3's activations      rG3  post the receive of its gradient
    wA3  wait until that receive has completed                wG3  likewise for the gradient
    sA3  post the send of micro-batch 3's activations         sG3  likewise for the gradient
    W    wait for every send posted so far (at drains)

Weights tied across stages under PACI (tied.py) add two kinds, on the tied group's own process group
between the owner and each holder: ``T`` (a holder's share of window w's tied gradient, holder ->
owner) and ``U`` (the owner's weight after its step w, owner -> holder). Their ``micro_batch`` field
holds the window and ``peer`` the other end (``sT0>0``: send window 0's share to stage 0); ``WU`` waits
for the tied weight sends only (the owner, before its next step overwrites the weight being sent).

Receives are posted early where the order of messages allows, so the transport moves a message while
the stage computes: the next activations of the same batch right after a forward's input arrived, and
a forward's gradient right after its activations were sent (``EAGER``). ``LAZY`` posts every
receive just before its wait.

Transport models, checked by ``check_transport`` (the runtime must obey the stricter one):

- ``gloo``: messages match per sender/receiver pair and direction, in posted order; an operation
  of one direction never waits for one of the other.
- ``nccl``: ProcessGroupNCCL runs every operation of one process group between two ranks on one
  stream, for both directions, in posted order; each send or receive completes only together with
  its match on the peer, so a blocked head blocks everything behind it on that pair. An operation
  can complete only when it is at the head of its stream on both ranks.

``Channels`` says which process group each message kind travels on: ``SHARED`` (one group for both
directions) or ``PER_DIRECTION`` (activations and gradients on groups of their own, hence streams of
their own). Fidelity limits: waits block the stage's program (on CUDA the compute stream waits, not
the host, which changes timing but not the order of posts); NCCL kernels are assumed to run
concurrently across streams; a send's data is ready when it is posted (it follows its compute).
Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from lightning_paci.dataflow import advance

ACTIVATION, GRADIENT = "A", "G"
TIED_GRAD, TIED_WEIGHT = "T", "U"  # tied.py under PACI: a holder's gradient share up, the owner's weight back
TIED_GROUP = "tied"  # the tied group's process group (one per tied group, tied.py)
POST_RECV, WAIT, SEND, WAIT_SENDS = "r", "w", "s", "W"
EAGER, LAZY = "eager", "lazy"
SHARED = {ACTIVATION: "pipeline", GRADIENT: "pipeline"}
PER_DIRECTION = {ACTIVATION: "activations", GRADIENT: "gradients"}
Transport = Literal["gloo", "nccl"]
_OP_RE = re.compile(r"^([rws])([AGTU])(\d+)(?:>(\d+))?$|^W(U?)$")


class CommOp(NamedTuple):
    """One point-to-point operation: ``verb`` r/w/s/W, ``kind`` A/G/T/U (None for W), its micro-batch (the
    window for T/U); ``peer``: the other stage, for T/U only (A/G go to a neighbour)."""

    verb: str
    kind: str | None = None
    micro_batch: int | None = None
    peer: int | None = None

    def __str__(self) -> str:
        if self.micro_batch is None:
            return self.verb + (self.kind or "")
        return f"{self.verb}{self.kind}{self.micro_batch}" + (f">{self.peer}" if self.peer is not None else "")

    __repr__ = __str__


def parse_op(token: str) -> CommOp | None:
    """The operation ``token`` names (``"sA3"``, ``"W"``), or None (``plan.parse_program`` reads actions
    and operations together)."""
    match = _OP_RE.match(token)
    if match is None:
        return None
    if match[1] is None:
        return CommOp(WAIT_SENDS, match[5] or None)
    return CommOp(match[1], match[2], int(match[3]), int(match[4]) if match[4] is not None else None)


def lower(actions: Sequence[Any], stage: int, n_stages: int, micro_batches: int,
          posting: str = EAGER, gradients: bool = True, wait_sends: bool = True) -> tuple[Any, ...]:
    """One stage's program: its actions with the sends, receives and waits they imply.

    Micro-batch ``j`` belongs to batch ``j // micro_batches``; with ``EAGER`` posting a stage posts
    the next activation receive only while another forward of the same batch follows (a receive left
    posted across a drain would swallow the first message after it). The runtime lowers one batch at a
    time with ``wait_sends=False`` and each drain with ``W`` at its end: no receive crosses a batch's
    end, so the concatenation is ``lower`` of the whole plan. ``gradients=False``: forwards only (an
    evaluation batch), no gradient comes back.
    """
    if posting not in (EAGER, LAZY):
        raise ValueError(f"posting={posting!r}: choose {EAGER!r} or {LAZY!r}")
    first, last = stage == 0, stage == n_stages - 1
    posted: set[int] = set()
    out: list[Any] = []
    for action in actions:
        j = action.micro_batch
        if action.kind == "F":
            if not first:
                if j not in posted:
                    out.append(CommOp(POST_RECV, ACTIVATION, j))
                posted.discard(j)
                out.append(CommOp(WAIT, ACTIVATION, j))
                if posting == EAGER and (j + 1) % micro_batches:
                    out.append(CommOp(POST_RECV, ACTIVATION, j + 1))
                    posted.add(j + 1)
            out.append(action)
            if not last:
                out.append(CommOp(SEND, ACTIVATION, j))
                if posting == EAGER and gradients:
                    out.append(CommOp(POST_RECV, GRADIENT, j))
        elif action.kind == "B":
            if not last:
                if posting == LAZY:
                    out.append(CommOp(POST_RECV, GRADIENT, j))
                out.append(CommOp(WAIT, GRADIENT, j))
            out.append(action)
            if not first:
                out.append(CommOp(SEND, GRADIENT, j))
        else:
            out.append(action)
    if posted:
        raise ValueError(f"stage {stage}: activation receives {sorted(posted)} left posted at the end")
    if wait_sends:
        out.append(CommOp(WAIT_SENDS))
    return tuple(out)


def lower_plan(plan: Any, posting: str = EAGER) -> tuple[tuple[Any, ...], ...]:
    return tuple(lower(actions, i, plan.n_stages, plan.micro_batches, posting)
                 for i, actions in enumerate(plan.stages))


def _peer(stage: int, op: CommOp) -> int:
    """The other end of ``op``: activations come from i-1 and go to i+1, gradients the other way."""
    if op.peer is not None:
        return op.peer
    toward_next = (op.kind == ACTIVATION) == (op.verb == SEND)
    return stage + 1 if toward_next else stage - 1


def _stream(stage: int, op: CommOp, transport: Transport, channels: dict[str, str]) -> tuple:
    peer, group = _peer(stage, op), channels.get(op.kind, TIED_GROUP)
    if transport == "nccl":  # one stream per (group, rank pair), both directions
        return group, min(stage, peer), max(stage, peer)
    sender, receiver = (stage, peer) if op.verb == SEND else (peer, stage)
    return group, op.kind, sender, receiver  # gloo: per message direction


def check_transport(programs: Sequence[Sequence[Any]], transport: Transport,
                    channels: dict[str, str] = SHARED) -> None:
    """Run the stages' programs under ``transport``'s matching rules; raise ValueError on a deadlock.

    Each stage advances through its program: compute actions and posts never block, ``w`` blocks
    until its receive completed, ``W`` until all of the stage's sends did. A posted operation joins
    the queue of its stream; the heads of a stream's two ends complete together when one is the
    send of the very message the other receives.
    """
    if transport not in ("gloo", "nccl"):
        raise ValueError(f"transport={transport!r}: choose 'gloo' or 'nccl'")
    n = len(programs)
    queues: dict[tuple, dict[int, deque[CommOp]]] = {}
    done: list[set[CommOp]] = [set() for _ in range(n)]
    open_sends: list[Counter] = [Counter() for _ in range(n)]  # by message kind

    def run(i: int, k: int, op: Any) -> bool:
        """Compute actions and posts never block; a wait runs once what it waits for completed."""
        if not isinstance(op, CommOp):
            return True
        if op.verb == WAIT:
            return CommOp(POST_RECV, op.kind, op.micro_batch, op.peer) in done[i]
        if op.verb == WAIT_SENDS:  # W: every send; WU: the tied weight sends
            return not (open_sends[i][op.kind] if op.kind else sum(open_sends[i].values()))
        peer = _peer(i, op)
        if not 0 <= peer < n:
            raise ValueError(f"stage {i}: {op} has no peer (stage {peer})")
        queues.setdefault(_stream(i, op, transport, channels), {}).setdefault(i, deque()).append(op)
        open_sends[i][op.kind] += op.verb == SEND
        return True

    def match() -> bool:
        """Complete the matching heads of every stream; True if any completed."""
        matched = False
        for ends in queues.values():
            if len(ends) < 2:
                continue
            (a, qa), (b, qb) = sorted(ends.items())
            while qa and qb:
                x, y = qa[0], qb[0]
                if {x.verb, y.verb} != {SEND, POST_RECV} or (x.kind, x.micro_batch) != (y.kind, y.micro_batch):
                    break
                qa.popleft(), qb.popleft()
                for stage, op in ((a, x), (b, y)):
                    done[stage].add(op)
                    open_sends[stage][op.kind] -= op.verb == SEND
                matched = True
        return matched

    cursor = advance(programs, run, match)
    stuck = [i for i in range(n) if cursor[i] < len(programs[i])]
    pending = {key: ends for key, ends in queues.items() if any(ends.values())}
    if stuck or pending:
        lines = [f"the plan's messages deadlock under {transport}'s rules ({_describe(channels)}):"]
        for i in range(n):
            program = programs[i]
            at = cursor[i]
            where = (f"waits at {program[at]} (slot {at})" if at < len(program) else "finished its program")
            lines.append(f"  stage {i} {where}; program: " + " ".join(
                f"[{o}]" if k == at else str(o) for k, o in enumerate(program)))
        for key, ends in pending.items():
            heads = ", ".join(f"stage {s}: {' '.join(map(str, q))}" for s, q in sorted(ends.items()) if q)
            lines.append(f"  stream {key}: queued {heads}")
        raise ValueError("\n".join(lines))


def _describe(channels: dict[str, str]) -> str:
    if channels[ACTIVATION] == channels[GRADIENT]:
        return "activations and gradients share one process group"
    return "activations and gradients on separate process groups"
