"""Executes one stage's share of a plan: a table of handlers, one per action and message operation.

The runtime knows no schedule. The strategy hands it ``spec.batch(stage, k)`` for each global
batch and ``spec.drain(stage, n)`` at drain points; the runtime lowers those actions into the stage's
program (``comm.lower``: the same sends, receives and waits that ``plan.validate`` proves deadlock-free
under gloo's and NCCL's rules) and runs that program in order, posting nothing it does not say. The
windows are the ones the caller reports (``closes_window``, Lightning's optimizer steps):

- ``F j``: run the user's training_step on micro-batch j (see hollow.py for how one process
  computes only its stage) on the activations ``wA j`` received; keep the graph until ``B j``.
- ``B j``: backward of micro-batch j with the gradient ``wG j`` received (the last stage uses its
  loss scaled by 1/accumulation); its input gradient waits for ``sG j``.
- ``S``: optimizer step of this stage, LR schedulers, clear gradients (PACI's tied weights: tied.py).
- ``R`` (data-parallel replicas only): the window's last backward all-reduces its gradients over the
  stage's replicas as it produces them; ``S`` waits for that first (allreduce.py).
- ``rA j``/``rG j`` post a receive, ``wA j``/``wG j`` wait for it, ``sA j``/``sG j`` post a send,
  ``W`` waits for every send (p2p.StageLink has one primitive for each).

``B`` and ``S`` call Lightning's backward and optimizer-step hooks as one device does (hooks.py).

Stale weights (PACI.md): the optimizer updates ``nn.Parameter(p.data)`` aliases whose ``.grad`` is
the real gradient. In-place writes through an alias do not bump the real parameter's version
counter, so a backward still in flight reads the updated weights instead of raising; no copy of a
parameter is ever made.

Non-finite windows (``skip_nonfinite_windows``, nonfinite.py): the flag rides upstream in the gradient
message; a skipped window drops its gradients and takes no optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_paci.allreduce import ReplicaGradients
from lightning_paci.batches import combine_outputs, join_predictions, split_batch
from lightning_paci.clock import clock_for
from lightning_paci.comm import TIED_GRAD, TIED_WEIGHT, WAIT, WAIT_SENDS, CommOp, lower
from lightning_paci.hollow import StageView
from lightning_paci.hooks import StageHooks
from lightning_paci.inputs import SharedRandomness, check_fingerprint, fingerprint
from lightning_paci.logs import LogCapture
from lightning_paci.nonfinite import WindowGuard, warn_nonfinite_loss
from lightning_paci.p2p import PipelineError, StageLink, report_failure
from lightning_paci.plan import Action, F
from lightning_paci.schedules import PlanSpec
from lightning_paci.telemetry import StageTelemetry
from lightning_paci.timeline import TimelineEvent

TIED = (TIED_GRAD, TIED_WEIGHT)  # tied-weight operations: their handlers take the whole operation (peer, window)


def _loss_of(output: Any) -> Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, Tensor):
        raise ValueError("training_step must return the loss tensor or a dict with a 'loss' tensor "
                         f"on the last pipeline stage, got {type(output).__name__}")
    return loss


def alias_parameters(optimizer: torch.optim.Optimizer) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Point the optimizer at ``nn.Parameter(p.data)`` aliases of this stage's own parameters (the stale
    weights note above); returns (parameter, alias) pairs.

    Hollow (meta) parameters of other stages are dropped from the param groups; empty groups stay so
    that LR schedulers see the groups they were built for.
    """
    pairs = []
    for group in optimizer.param_groups:
        owned = [p for p in group["params"] if not p.is_meta]
        aliases = [nn.Parameter(p.data, requires_grad=p.requires_grad) for p in owned]
        pairs += list(zip(owned, aliases))
        group["params"] = aliases
    return pairs


class StageRuntime:
    """One stage's executor; ``aliases`` pairs each owned parameter with its optimizer alias."""

    def __init__(self, module: nn.Module, view: StageView, spec: PlanSpec, link: StageLink,
                 optimizer: torch.optim.Optimizer, aliases: list[tuple[nn.Parameter, nn.Parameter]],
                 schedulers: list[Any], device: torch.device,
                 forward_context: Callable[[], Any] = nullcontext, hooks: StageHooks | None = None,
                 record_timeline: bool = False, seed: int = 0, tied: Any = None,
                 replicas: ReplicaGradients | None = None, skip_nonfinite_windows: bool = False) -> None:
        self.module, self.view, self.spec, self.link = module, view, spec, link
        self.stage, self.last = view.stage, view.stage == spec.n_stages - 1
        self.optimizer, self.aliases, self.schedulers = optimizer, aliases, schedulers
        self.tied = tied  # weights tied across stages (tied.py): an all-reduce at S, or PACI's messages around it
        self.device, self.forward_context, self.hooks = device, forward_context, hooks
        self.replicas = replicas
        # Keys: an action's kind, or an operation's verb and message kind (comm.py's text form).
        self.handlers: dict[str, Callable[[Any], None]] = {
            "F": self._forward, "B": self._backward, "S": self._step, "R": self._allreduce,
            "rA": self._post_activations, "wA": self._wait_activations, "sA": self._send_activations,
            "rG": self._post_grads, "wG": self._wait_grads, "sG": self._send_grads, "W": self._wait_sends,
            **(tied.handlers if tied is not None else {})}
        self._eval_handlers = {**self.handlers, "F": self._eval_forward}
        entry = module.get_submodule(view.entry) if view.entry is not None else None
        self.randomness = SharedRandomness(seed, self.stage, device, entry)
        self.guard = WindowGuard(self.stage, device, skip_nonfinite_windows)
        self.trace: list[Any] | None = None  # see record_trace
        self._forwards = self._eval_forwards = 0  # micro-batches run, counted alike on every stage
        self.batches_since_drain = 0
        self._closing: set[int] = set()  # batches since the last drain that end an accumulation window
        self.version = 0  # optimizer steps taken by this stage
        self._in_flight: dict[int, tuple[list[Tensor], list[Tensor], int]] = {}
        # Messages between the operation that moves them and the action that uses or makes them, by micro-batch.
        self._arrived: dict[int, tuple[list[Tensor], Tensor]] = {}  # activations + the sender's fingerprint
        self._to_send: dict[int, tuple[list[Tensor], Tensor]] = {}  # activations + this stage's fingerprint
        self._grads_in: dict[int, tuple[list[Tensor], Tensor, Tensor]] = {}  # gradients, loss, non-finite flag
        self._grads_out: dict[int, tuple[list[Tensor], Tensor, Tensor, Any]] = {}  # ..., after_backward's args
        self._window_ends: set[int] = set()  # micro-batches whose backward is followed by S in this program
        self._last_backward: int | None = None
        self._micro: list[Any] = []
        self._first = 0
        self._batch_idx = 0
        self._evaluation: tuple = ()  # (micro-batches, step, batch_idx, extra, what, results) of an eval batch
        self._losses: list[Tensor] = []
        self._output: Any = None
        self._log = LogCapture(module, self.last)
        self._nonfinite_seen = False
        self._unchecked: list[tuple[Tensor, Tensor, int, int, str]] = []  # fingerprints not yet compared
        self.clock = link.clock = clock_for(device)
        self.stats = StageTelemetry(self.stage, device, self.clock, record_timeline)
        self._last_end: Any = None  # clock mark: end of the previous training batch, None after a drain

    def record_trace(self) -> list[Any]:
        """From now on, every action and operation this stage executes, in order (the link adds its
        operations where it carries them out); tests compare it with ``comm.lower`` of the plan."""
        self.trace = self.link.trace = []
        return self.trace

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
            # sends are waited for at drains (and by back-pressure)
            self._run(self._program(self.spec.batch(self.stage, k, self._closing), False, wait_sends=False),
                      f"batch {k} since the last drain")
        finally:
            if self.hooks is not None:
                self.hooks.direct = False
        self.batches_since_drain += 1
        self._last_end = self.clock.mark()
        # the wall includes the loop's time between batches: idle, not busy
        self.stats.span(start, self._last_end, self.link.take_waits())
        self._check_fingerprints()
        self._log.flush()
        if self.last and not self._nonfinite_seen and not self.guard.enabled:
            self._nonfinite_seen = warn_nonfinite_loss(torch.stack(self._losses), self.stage, self._first,
                                                       batch_idx, steps_before)
        loss = torch.stack(self._losses).mean() if self._losses else torch.tensor(float("nan"))
        if isinstance(self._output, dict):
            return {**self._output, "loss": loss}
        return loss

    def drain(self) -> None:
        """Finish every backward in flight, with the steps of the windows that ended: all stages then
        hold equal versions. A window still open keeps its gradients and goes on after the drain."""
        if self.batches_since_drain == 0 and not self._in_flight:
            return
        self._losses = []
        start = self.clock.mark()
        actions = self.spec.drain(self.stage, self.batches_since_drain, self._closing)
        self._run(self._program(actions, True), "drain")  # ends with W
        self._closing = set()
        if self.tied is not None:
            self.tied.drained(self.version)
        self.stats.span(start, self.clock.mark(), self.link.take_waits())
        self.stats.settle(block=True)
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
        return join_predictions([r for r, _ in results], [n for _, n in results]) if self.last else None

    def _forward_only(self, step_name: str, batch: Any, batch_idx: int, extra: tuple) -> list[tuple[Any, int]]:
        """Each micro-batch's result (None before the last stage) with its size."""
        self.drain()
        micro = split_batch(batch, self.spec.micro_batches, exact=False)
        what = step_name[:-len("_step")]
        self._evaluation = (micro, getattr(self.module, step_name), batch_idx, extra, what, [])
        program = lower([F(j) for j in range(len(micro))], self.stage, self.spec.n_stages, len(micro),
                        gradients=False, wait_sends=False)
        with torch.no_grad():
            self._run(program, f"{what} batch {batch_idx}", self._eval_handlers, timed=False)
        results, self._evaluation = self._evaluation[-1], ()
        self._check_fingerprints()
        self._log.weight = 1
        self._log.flush()
        self.link.take_waits()  # evaluation is not training time: its waits stay out of telemetry
        return results

    # -- the table of handlers -------------------------------------------------------------------------
    def _program(self, actions: Sequence[Action], drain: bool, **kwargs: Any) -> Sequence[Action | CommOp]:
        """``comm.lower`` of a batch's or drain's actions, with PACI's tied-weight messages (tiedplan.py)."""
        program = lower(actions, self.stage, self.spec.n_stages, self.spec.micro_batches, **kwargs)
        return program if self.tied is None else self.tied.lower(program, self.version, drain)

    def _run(self, program: Sequence[Action | CommOp], where: str, handlers: dict | None = None,
             timed: bool = True) -> None:
        """Execute ``program`` in order. Telemetry times each compute action together with the operations
        around it that serve it: the receives before it, the sends after it (as timeline.py draws them);
        a unit ends before the next wait or compute action."""
        handlers = handlers or self.handlers
        self._window_ends = _window_ends(program) if self.guard.enabled else set()
        unit: tuple[Any, Action | None] | None = None  # (start mark, its compute action) of the unit open
        for index, op in enumerate(program):
            compute = isinstance(op, Action)
            if unit is not None and unit[1] is not None and (compute or op.verb in (WAIT, WAIT_SENDS)):
                self.stats.action(unit[1].kind, str(unit[1]), unit[0], self.clock.mark(), self.link.take_waits())
                unit = None
            if unit is None and timed:
                self.link.take_waits()  # waits outside units belong to the batch's wall time only
                unit = (self.clock.mark(), None)
            key = op.kind if compute else op.verb + (op.kind or "")
            handler = handlers.get(key)
            try:
                if handler is None:
                    raise PipelineError(f"no handler for {op}")
                handler(op if not compute and op.kind in TIED else op.micro_batch)
            except PipelineError:
                raise
            except Exception as error:
                note = (f"stage {self.stage} failed at {op} (micro-batch {op.micro_batch}, {where}): "
                        f"{type(error).__name__}: {error}")
                report_failure(note)
                marked = " ".join(f"[{a}]" if k == index else str(a) for k, a in enumerate(program))
                raise PipelineError(f"{note}\nstage {self.stage} program for {where}: {marked}") from error
            if self.trace is not None and (compute or op.kind in TIED):  # the link traces its own operations
                self.trace.append(op)
            if compute and unit is not None:
                unit = (unit[0], op)
        if unit is not None and unit[1] is not None:
            self.stats.action(unit[1].kind, str(unit[1]), unit[0], self.clock.mark(), self.link.take_waits())

    # Message operations: the link moves the message, the runtime keeps it for the action that needs it.
    def _post_activations(self, j: int) -> None:
        self.link.post_activations(j)

    def _wait_activations(self, j: int) -> None:
        self._arrived[j] = self.link.wait_activations(j)

    def _send_activations(self, j: int) -> None:
        self.link.send_activations(j, *self._to_send.pop(j))

    def _post_grads(self, j: int) -> None:
        self.link.post_grads(j, self._in_flight[j][1])  # buffers shaped like the outputs that get a gradient

    def _wait_grads(self, j: int) -> None:
        self._grads_in[j] = self.link.wait_grads(j)

    def _send_grads(self, j: int) -> None:
        grads, loss, flag, after = self._grads_out.pop(j)
        self.link.send_grads(j, grads, loss, flag)
        if after is not None:  # after the send: the previous stage need not wait for the hook
            self.hooks.after_backward(*after)

    def _wait_sends(self, _: None) -> None:
        self.link.wait_sends()
        if self.tied is not None:
            self.tied.wait_sends()

    def _received(self, j: int, mine: Tensor, batch_idx: int, index: int, what: str) -> list[Tensor]:
        """The activations ``wA j`` received (none on stage 0); their fingerprint is checked against
        this stage's copy of the micro-batch (inputs.py)."""
        if self.stage == 0:
            return []
        received, theirs = self._arrived.pop(j)
        self._unchecked.append((mine, theirs, batch_idx, index, what))
        if self.device.type == "cpu":
            self._check_fingerprints()
        return received

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
        mine = fingerprint(part, self.device)
        received = self._received(j, mine, self._batch_idx, j - self._first, "training")
        step = self.module.training_step
        with self._log, self.forward_context(), self.randomness.forward(0, self._forwards):
            result, out = self.view.run(lambda: step(part, self._batch_idx), received)
        self._forwards += 1
        if out is not None:
            self._to_send[j] = (out, mine)
            outputs = [t for t in out if t.requires_grad]  # what gets a gradient back (the header says so)
        else:
            loss = _loss_of(result)
            self._losses.append(loss.detach())
            self._output = result if isinstance(result, dict) else None
            outputs = [loss / self.spec.accumulation]
        inputs = [t for t in received if t.requires_grad]
        self._in_flight[j] = (inputs, outputs, self.version)
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, len(self._in_flight))

    def _eval_forward(self, j: int) -> None:
        micro, step, batch_idx, extra, what, results = self._evaluation
        part = micro[j]
        mine = fingerprint(part, self.device)
        received = self._received(j, mine, batch_idx, j, what)
        self._log.weight = len(tree_flatten(part)[0][0]) if tree_flatten(part)[0] else 1
        with self._log, self.forward_context(), self.randomness.forward(1, self._eval_forwards):
            result, out = self.view.run(lambda: step(part, batch_idx, *extra), received)
        self._eval_forwards += 1
        if out is not None:
            self._to_send[j] = (out, mine)
        results.append((result, self._log.weight))

    def _backward(self, j: int) -> None:
        inputs, outputs, version = self._in_flight.pop(j)
        hooks = self.hooks
        if self.last:
            scaled = outputs[0]
            loss = scaled.detach() * self.spec.accumulation
            self.guard.loss(loss)
            if hooks is not None:
                scaled = hooks.before_backward(scaled, self.version)
            scaled.backward()
        else:
            grads, loss, flag = self._grads_in.pop(j)
            self.guard.arrived(flag)
            scaled = loss / self.spec.accumulation
            if hooks is not None:
                hooks.before_backward(scaled, self.version)
            pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            self._losses.append(loss)
        self.guard.backward_done()
        if j in self._window_ends:  # the window's last backward: its flag must leave with this gradient
            self.guard.gradients(self._own_grads())
        self._last_backward = j
        after = (scaled, self.version) if hooks is not None else None
        if self.stage > 0:
            input_grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs]
            self._grads_out[j] = (input_grads, loss, self.guard.flag(), after)
        elif after is not None:
            hooks.after_backward(*after)
        self.stats.drift[self.version - version] += 1

    def _allreduce(self, _: None) -> None:
        if self.replicas is None:
            raise PipelineError("R in the plan of a stage without data-parallel replicas")
        self.replicas.start()

    def _own_grads(self) -> list[Tensor]:
        return [p.grad for p, _ in self.aliases if p.grad is not None]

    def _step(self, _: None) -> None:
        if self.replicas is not None:
            self.replicas.finish()  # every hook and the optimizer see the replicas' mean gradient
            self.guard.backward_done()  # a replica's non-finite gradient reaches every replica's mean
        if self.tied is not None:  # after the replicas' mean: tied holders sum means (tied.py)
            self.tied()
            self.guard.backward_done()  # tied gradients summed in from other stages: checked again at the step
        for param, alias in self.aliases:
            alias.grad = param.grad
        if self.hooks is not None:  # the hooks see the real parameters' grads, clipping acts on the aliases'
            self.hooks.before_step(self.optimizer, self.version)
        if not self.guard.skip(self._own_grads(), self._last_backward):
            self.optimizer.step()
        self.version += 1
        for config in self.schedulers:
            if self.version % config.frequency == 0:
                config.scheduler.step()
        for param, alias in self.aliases:
            param.grad = alias.grad = None

    # -- telemetry -------------------------------------------------------------------------------------
    @property
    def timeline(self) -> list[TimelineEvent] | None:
        return self.stats.timeline

    @property
    def clock_origin(self) -> float:
        """``time.perf_counter()`` that timeline times count from; one clock for all processes of a host."""
        return self.stats.origin

    def telemetry(self) -> dict[str, Any]:
        return {**self.stats.summary(self.version, sum(p.numel() for p, _ in self.aliases)),
                "skipped_windows": self.guard.skipped, **(self.tied.telemetry() if self.tied is not None else {})}


def _window_ends(program: Sequence[Action | CommOp]) -> set[int]:
    """Micro-batches whose backward completes a window: the next action after it is S."""
    actions = [op for op in program if isinstance(op, Action)]
    return {a.micro_batch for a, b in zip(actions, actions[1:]) if a.kind == "B" and b.kind == "S"}
