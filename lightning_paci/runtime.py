"""Executes one stage's share of a plan: a table of handlers, one per action kind.

The runtime knows no schedule. The strategy hands it ``spec.batch(stage, k)`` for each global
batch and ``spec.drain(stage, n)`` at drain points; the runtime runs those actions in order. The
windows are the ones the caller reports (``closes_window``, Lightning's optimizer steps):

- ``F j``: run the user's training_step on micro-batch j (see hollow.py for how one process
  computes only its stage), send the boundary tensors on, keep the graph until ``B j``.
- ``B j``: backward of micro-batch j with the gradient from the next stage (the last stage uses its
  loss scaled by 1/accumulation), send the input gradient back.
- ``S``: optimizer step of this stage, LR schedulers, clear gradients.

``B`` and ``S`` call Lightning's backward and optimizer-step hooks as one device does (hooks.py).

Stale weights (PACI.md): the optimizer updates ``nn.Parameter(p.data)`` aliases whose ``.grad`` is
the real gradient. In-place writes through an alias do not bump the real parameter's version
counter, so a backward still in flight reads the updated weights instead of raising; no copy of a
parameter is ever made.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_paci.clock import clock_for
from lightning_paci.hollow import StageView
from lightning_paci.hooks import StageHooks
from lightning_paci.inputs import SharedRandomness, check_fingerprint, fingerprint
from lightning_paci.logs import LogCapture, combine_outputs
from lightning_paci.memory import PeakMemory
from lightning_paci.p2p import PipelineError, StageLink, report_failure
from lightning_paci.plan import Action
from lightning_paci.schedules import PlanSpec
from lightning_paci.timeline import TimelineEvent


def split_batch(batch: Any, parts: int, exact: bool) -> list[Any]:
    """Split a batch into ``parts`` micro-batches along the batch dimension, following its structure.

    Tensors split along dim 0; a list or tuple that holds no tensor and has one entry per sample
    (strings, ids: what the default collate makes of non-tensor fields) splits with the same
    boundaries; mappings, tuples and lists that hold tensors are structure and keep their shape;
    scalars (and 0-d tensors) go to every micro-batch. A tensor-free list of plain values and of
    another length is refused: it cannot be told apart from per-sample data cut short.
    """
    sizes: set[int] = set()
    _batch_sizes(batch, sizes, tensors=_holds_tensor(batch))
    if len(sizes) != 1:
        raise ValueError(f"cannot split the batch into micro-batches: its tensors have first dimensions "
                         f"{sorted(sizes)}; every tensor of a batch needs the same batch dimension 0")
    size = sizes.pop()
    if exact and size % parts:
        raise ValueError(f"batch size {size} is not divisible by micro_batches={parts}: make the "
                         "DataLoader's batch_size a multiple of micro_batches (and use drop_last=True)")
    parts = min(parts, size)
    bounds = [k * (size // parts) + min(k, size % parts) for k in range(parts + 1)]  # torch.tensor_split's
    return [_take(batch, bounds[k], bounds[k + 1], size, "batch") for k in range(parts)]


def _holds_tensor(node: Any) -> bool:
    if isinstance(node, Tensor):
        return True
    if isinstance(node, Mapping):
        return any(_holds_tensor(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return any(_holds_tensor(v) for v in node)
    return False


def _batch_sizes(node: Any, sizes: set[int], tensors: bool) -> None:
    """First dimensions of the tensors (``tensors``) or, in a batch without any, of the innermost lists."""
    if isinstance(node, Tensor):
        if node.dim():
            sizes.add(len(node))
    elif isinstance(node, Mapping):
        for value in node.values():
            _batch_sizes(value, sizes, tensors)
    elif isinstance(node, (list, tuple)):
        nested = [v for v in node if isinstance(v, (Mapping, list, tuple, Tensor))]
        if not tensors and node and not nested:
            sizes.add(len(node))
        for value in nested:
            _batch_sizes(value, sizes, tensors)


def _take(node: Any, start: int, stop: int, size: int, where: str) -> Any:
    """Samples ``start:stop`` of ``node`` (``where`` names it in errors, e.g. ``batch['text']``)."""
    if isinstance(node, Tensor):
        return node[start:stop] if node.dim() else node
    if isinstance(node, Mapping):
        part = copy.copy(node)  # keeps the mapping's type (OrderedDict, HF's BatchEncoding, ...)
        for key, value in node.items():
            part[key] = _take(value, start, stop, size, f"{where}[{key!r}]")
        return part
    if isinstance(node, (list, tuple)):
        if _holds_tensor(node):
            items = [_take(v, start, stop, size, f"{where}[{i}]") for i, v in enumerate(node)]
        elif len(node) == size:
            items = list(node[start:stop])
        elif any(isinstance(v, (Mapping, list, tuple)) for v in node):
            items = [_take(v, start, stop, size, f"{where}[{i}]") for i, v in enumerate(node)]
        else:
            raise ValueError(f"cannot split the batch into micro-batches: {where} is a {type(node).__name__} "
                             f"of {len(node)} entries without tensors, but the batch has {size} samples; a "
                             "list in a batch must hold one entry per sample (or tensors), else pass it "
                             "another way (a module attribute, a tensor)")
        if isinstance(node, tuple) and hasattr(node, "_fields"):  # namedtuple
            return type(node)(*items)
        return type(node)(items)
    return node


_SETTLE_EVERY = 512  # actions between non-blocking settles of clock marks


def join_micro_batches(results: list[Any], sizes: list[int]) -> Any:
    """The inverse of ``split_batch`` for a step's outputs: the micro-batches' results concatenated
    along dim 0 when every result has the same structure of tensors whose dim 0 is its micro-batch's
    size (what ``predict_step`` returns for a batch); otherwise the list of results, in order."""
    if len(results) == 1:
        return results[0]
    flat = [tree_flatten(r) for r in results]
    spec = flat[0][1]
    joinable = all(leaves and s == spec and all(isinstance(x, Tensor) and x.dim() and len(x) == n for x in leaves)
                   for (leaves, s), n in zip(flat, sizes))
    if not joinable:
        return results
    return tree_unflatten([torch.cat(column) for column in zip(*(leaves for leaves, _ in flat))], spec)


def _loss_of(output: Any) -> Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, Tensor):
        raise ValueError("training_step must return the loss tensor or a dict with a 'loss' tensor "
                         f"on the last pipeline stage, got {type(output).__name__}")
    return loss


class StageRuntime:
    """One stage's executor; ``aliases`` pairs each owned parameter with its optimizer alias."""

    def __init__(self, module: nn.Module, view: StageView, spec: PlanSpec, link: StageLink,
                 optimizer: torch.optim.Optimizer, aliases: list[tuple[nn.Parameter, nn.Parameter]],
                 schedulers: list[Any], device: torch.device,
                 forward_context: Callable[[], Any] = nullcontext, hooks: StageHooks | None = None,
                 record_timeline: bool = False, seed: int = 0) -> None:
        self.module, self.view, self.spec, self.link = module, view, spec, link
        self.stage, self.last = view.stage, view.stage == spec.n_stages - 1
        self.optimizer, self.aliases, self.schedulers = optimizer, aliases, schedulers
        self.device, self.forward_context, self.hooks = device, forward_context, hooks
        self.handlers = {"F": self._forward, "B": self._backward, "S": self._step}
        entry = module.get_submodule(view.entry) if view.entry is not None else None
        self.randomness = SharedRandomness(seed, self.stage, device, entry)
        self._forwards = self._eval_forwards = 0  # micro-batches run, counted alike on every stage
        self.batches_since_drain = 0
        self._closing: set[int] = set()  # batches since the last drain that end an accumulation window
        self.version = 0  # optimizer steps taken by this stage
        self._in_flight: dict[int, tuple[list[Tensor], list[Tensor], int]] = {}
        self._micro: list[Any] = []
        self._first = 0
        self._batch_idx = 0
        self._losses: list[Tensor] = []
        self._output: Any = None
        self._log = LogCapture(module, self.last)
        self._nonfinite_seen = False
        self._unchecked: list[tuple[Tensor, Tensor, int, int, str]] = []  # fingerprints not yet compared
        # telemetry
        self.drift = Counter()
        self.peak_in_flight = 0
        self.busy_s = self.wall_s = self.wait_s = 0.0
        self.time_of = {"F": [0.0, 0], "B": [0.0, 0], "S": [0.0, 0]}
        self.timeline: list[TimelineEvent] | None = [] if record_timeline else None
        self.memory = PeakMemory(device)
        self.clock = link.clock = clock_for(device)
        self._t0 = time.perf_counter()
        self._last_end: Any = None  # clock mark: end of the previous training batch, None after a drain
        # Clock marks not yet turned into seconds (clock.py): (kind, label, start, end, waits) of each
        # action, and (start, end, waits) of spans that count as wall time (a batch, a drain).
        self._unsettled: list[tuple[str, str, Any, Any, list]] = []
        self._unsettled_wall: list[tuple[Any, Any, list]] = []

    # -- entry points (called by the strategy) --------------------------------------------------------
    def train_batch(self, batch: Any, batch_idx: int, closes_window: bool | None = None) -> Any:
        """Run this stage's actions for the next batch. ``closes_window``: the caller steps after this
        batch (Lightning's window ends); the stage steps after its last micro-batch's backward, which
        under PACI may run during a later batch or the next drain. None: every accumulation-th backward."""
        k = self.batches_since_drain
        m = self.spec.micro_batches
        if closes_window is None:
            closes_window = ((k + 1) * m) % self.spec.accumulation == 0
        if closes_window:
            self._closing.add(k)
        start = self._last_end if self._last_end is not None else self.clock.mark()
        steps_before = self.version
        self._micro = split_batch(batch, m, exact=True)
        self._first, self._batch_idx, self._losses, self._output = k * m, batch_idx, [], None
        if self.hooks is not None:
            self.hooks.direct = self.last  # the logger's process, inside a batch: hooks log as usual
        try:
            self._run(self.spec.batch(self.stage, k, self._closing), f"batch {k} since the last drain")
        finally:
            if self.hooks is not None:
                self.hooks.direct = False
        self.batches_since_drain += 1
        self._last_end = self.clock.mark()
        # the wall includes the loop's time between batches: idle, not busy
        self._unsettled_wall.append((start, self._last_end, self.link.take_waits()))
        if len(self._unsettled) >= _SETTLE_EVERY:
            self._settle(block=False)
        self._check_fingerprints()
        self._log.flush()
        if self.last and not self._nonfinite_seen:
            self._report_nonfinite(batch_idx, steps_before)
        loss = torch.stack(self._losses).mean() if self._losses else torch.tensor(float("nan"))
        if isinstance(self._output, dict):
            return {**self._output, "loss": loss}
        return loss

    def _report_nonfinite(self, batch_idx: int, steps_before: int) -> None:
        """Say once, where it first happens, that a non-finite loss entered the pipeline (one host sync
        per batch on the last stage): its gradients reach every stage and nothing skips them."""
        losses = torch.stack(self._losses)
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
        if bad:
            self._nonfinite_seen = True
            rank_zero_warn(f"lightning_paci: stage {self.stage} computed a non-finite loss "
                           f"({losses[bad[0]].item()}) for micro-batch {self._first + bad[0]} (batch_idx "
                           f"{batch_idx}, after {steps_before} optimizer steps of this stage); its gradients "
                           "reach every stage, and each stage's next step makes its weights non-finite")

    def drain(self) -> None:
        """Finish every backward in flight, with the steps of the windows that ended: all stages then
        hold equal versions. A window still open keeps its gradients and goes on after the drain."""
        if self.batches_since_drain == 0 and not self._in_flight:
            return
        self._losses = []
        start = self.clock.mark()
        self._run(self.spec.drain(self.stage, self.batches_since_drain, self._closing), "drain")
        self._closing = set()
        self.link.flush()
        self._unsettled_wall.append((start, self.clock.mark(), self.link.take_waits()))
        self._settle(block=True)
        self._last_end = None
        assert not self._in_flight, f"stage {self.stage}: micro-batches {sorted(self._in_flight)} not drained"
        self.batches_since_drain = 0

    def eval_batch(self, step_name: str, batch: Any, batch_idx: int, *extra: Any) -> Any:
        """Forward-only pipelining of ``validation_step``/``test_step`` over the micro-batches."""
        results = self._forward_only(step_name, batch, batch_idx, extra)
        return combine_outputs(step_name, [r for r, _ in results], [n for _, n in results]) if self.last else None

    def predict_batch(self, batch: Any, batch_idx: int, *extra: Any) -> Any:
        """``predict_step`` pipelined as evaluation: the batch's predictions on the last stage, else None."""
        results = self._forward_only("predict_step", batch, batch_idx, extra)
        return join_micro_batches([r for r, _ in results], [n for _, n in results]) if self.last else None

    def _forward_only(self, step_name: str, batch: Any, batch_idx: int, extra: tuple) -> list[tuple[Any, int]]:
        """Each micro-batch's result (None before the last stage) with its size."""
        self.drain()
        micro = split_batch(batch, self.spec.micro_batches, exact=False)
        step = getattr(self.module, step_name)
        results = []
        with torch.no_grad():
            for index, part in enumerate(micro):
                received, mine = self._receive(part, batch_idx, index, step_name[:-len("_step")])
                self._log.weight = len(tree_flatten(part)[0][0]) if tree_flatten(part)[0] else 1
                with self._log, self.forward_context(), self.randomness.forward(1, self._eval_forwards):
                    result, out = self.view.run(lambda: step(part, batch_idx, *extra), received)
                self._eval_forwards += 1
                if out is not None:
                    self.link.send_activations(out, mine)
                results.append((result, self._log.weight))
        self._check_fingerprints()
        self._log.weight = 1
        self._log.flush()
        self.link.take_waits()  # evaluation is not training time: its waits stay out of telemetry
        return results

    # -- the table of handlers -------------------------------------------------------------------------
    def _run(self, actions: tuple[Action, ...], where: str) -> None:
        for index, action in enumerate(actions):
            handler = self.handlers.get(action.kind)
            self.link.take_waits()  # waits between actions belong to the batch's wall time only
            t0 = self.clock.mark()
            try:
                if handler is None:
                    raise PipelineError(f"unknown action {action}")
                handler(action.micro_batch)
            except PipelineError:
                raise
            except Exception as error:
                note = (f"stage {self.stage} failed at {action} (micro-batch {action.micro_batch}, {where}): "
                        f"{type(error).__name__}: {error}")
                report_failure(note)
                marked = " ".join(f"[{a}]" if k == index else str(a) for k, a in enumerate(actions))
                raise PipelineError(f"{note}\nstage {self.stage} actions for {where}: {marked}") from error
            self._unsettled.append((action.kind, str(action), t0, self.clock.mark(), self.link.take_waits()))
            self.memory.sample()

    def _settle(self, block: bool) -> None:
        """Turn the clock marks of finished actions into telemetry and timeline events; with
        ``block=False`` only those already complete (on CUDA: events the stream has passed)."""
        seconds = self.clock.seconds
        done = 0
        for kind, label, t0, t1, waits in self._unsettled:
            if not block and not self.clock.ready(t1):
                break
            t0, t1 = seconds(t0), seconds(t1)
            waits = [(seconds(a), seconds(b), what) for a, b, what in waits]
            waited = sum(b - a for a, b, _ in waits)
            self.busy_s += (t1 - t0) - waited
            self.wait_s += waited
            self.time_of[kind][0] += (t1 - t0) - waited
            self.time_of[kind][1] += 1
            if self.timeline is not None:
                self._record(label, t0, t1, waits)
            done += 1
        del self._unsettled[:done]
        done = 0
        for start, end, waits in self._unsettled_wall:
            if not block and not self.clock.ready(end):
                break
            self.wall_s += seconds(end) - seconds(start)
            self.wait_s += sum(seconds(b) - seconds(a) for a, b, _ in waits)
            done += 1
        del self._unsettled_wall[:done]

    def _record(self, label: str, t0: float, t1: float, waits: list[tuple[float, float, str]]) -> None:
        """Timeline events of one action: waits for its input ("recv F3"), its compute, then send
        back-pressure ("send F3"); every handler receives before it computes and sends after."""
        o = self._t0
        begin = max((end for _, end, kind in waits if kind == "recv"), default=t0)
        end = min((start for start, _, kind in waits if kind == "send"), default=t1)
        if begin > t0:
            self.timeline.append(TimelineEvent(self.stage, f"recv {label}", t0 - o, begin - o))
        self.timeline.append(TimelineEvent(self.stage, label, begin - o, end - o))
        if end < t1:
            self.timeline.append(TimelineEvent(self.stage, f"send {label}", end - o, t1 - o))

    def _receive(self, part: Any, batch_idx: int, index: int, what: str) -> tuple[list[Tensor], Tensor]:
        """The activations for micro-batch ``part`` (none on stage 0) and its fingerprint, checked
        against the previous stage's copy of the micro-batch (inputs.py)."""
        mine = fingerprint(part, self.device)
        if self.stage == 0:
            return [], mine
        received, theirs = self.link.recv_activations()
        self._unchecked.append((mine, theirs, batch_idx, index, what))
        if self.device.type == "cpu":
            self._check_fingerprints()
        return received, mine

    def _check_fingerprints(self) -> None:
        """Compare the fingerprints received so far with this stage's own. On CPU after every receive;
        on a GPU once per batch (one device sync for all its micro-batches, none per message)."""
        if not self._unchecked:
            return
        pending, self._unchecked = self._unchecked, []
        differ = torch.stack([~torch.isclose(m, t, rtol=1e-9, atol=1e-9).all() for m, t, *_ in pending])
        if bool(differ.any()):
            mine, theirs, batch_idx, index, what = pending[int(differ.nonzero()[0, 0])]
            try:
                check_fingerprint(mine, theirs, self.stage, batch_idx, index, what)
            except ValueError as error:
                report_failure(f"stage {self.stage}: {error}")
                raise

    def _forward(self, j: int) -> None:
        part = self._micro[j - self._first]
        received, mine = self._receive(part, self._batch_idx, j - self._first, "training")
        if self.stage > 0 and j + 1 < self._first + len(self._micro):
            self.link.expect_activations()  # the batch's next forward follows: gloo receives it meanwhile
        step = self.module.training_step
        with self._log, self.forward_context(), self.randomness.forward(0, self._forwards):
            result, out = self.view.run(lambda: step(part, self._batch_idx), received)
        self._forwards += 1
        if out is not None:
            self.link.send_activations(out, mine)
            outputs = [t for t in out if t.requires_grad]  # what gets a gradient back (the header says so)
            self.link.expect_grads(outputs)
        else:
            loss = _loss_of(result)
            self._losses.append(loss.detach())
            self._output = result if isinstance(result, dict) else None
            outputs = [loss / self.spec.accumulation]
        inputs = [t for t in received if t.requires_grad]
        self._in_flight[j] = (inputs, outputs, self.version)
        self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))

    def _backward(self, j: int) -> None:
        inputs, outputs, version = self._in_flight.pop(j)
        hooks = self.hooks
        if self.last:
            scaled = outputs[0]
            loss = scaled.detach() * self.spec.accumulation
            if hooks is not None:
                scaled = hooks.before_backward(scaled, self.version)
            scaled.backward()
        else:
            grads, loss = self.link.recv_grads(outputs)
            scaled = loss.squeeze(0) / self.spec.accumulation
            if hooks is not None:
                hooks.before_backward(scaled, self.version)
            pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            self._losses.append(loss.squeeze(0))
        if self.stage > 0:
            self.link.send_grads([t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs], loss)
        if hooks is not None:  # after the send: the previous stage need not wait for the hook
            hooks.after_backward(scaled, self.version)
        self.drift[self.version - version] += 1

    def _step(self, _: None) -> None:
        for param, alias in self.aliases:
            alias.grad = param.grad
        if self.hooks is not None:  # the hooks see the real parameters' grads, clipping acts on the aliases'
            self.hooks.before_step(self.optimizer, self.version)
        self.optimizer.step()
        self.version += 1
        for config in self.schedulers:
            if self.version % config.frequency == 0:
                config.scheduler.step()
        for param, alias in self.aliases:
            param.grad = alias.grad = None

    # -- telemetry -------------------------------------------------------------------------------------
    @property
    def clock_origin(self) -> float:
        """``time.perf_counter()`` that timeline times count from; one clock for all processes of a host."""
        return self._t0

    def telemetry(self) -> dict[str, Any]:
        self._settle(block=True)
        wall = max(self.wall_s, 1e-12)
        mean = {k: (t / n if n else 0.0) for k, (t, n) in self.time_of.items()}
        return {
            "stage": self.stage,
            "max_drift": max(self.drift, default=0),
            "drift_histogram": dict(sorted(self.drift.items())),
            "utilization": self.busy_s / wall,
            "bubble_fraction": self.wait_s / wall,
            "peak_in_flight": self.peak_in_flight,
            "optimizer_steps": self.version,
            "peak_memory_bytes": self.memory.peak,
            "busy_s": self.busy_s,
            "wait_s": self.wait_s,
            "wall_s": self.wall_s,
            "forward_s": mean["F"],
            "backward_s": mean["B"],
            "step_s": mean["S"],
            "parameters": sum(p.numel() for p, _ in self.aliases),
        }

