"""Executes one stage's share of a plan: a table of handlers, one per action kind.

The runtime knows no schedule. The strategy hands it ``spec.batch(stage, k)`` for each global
batch and ``spec.drain(stage, n)`` at drain points; the runtime runs those actions in order:

- ``F j``: run the user's training_step on micro-batch j (see hollow.py for how one process
  computes only its stage), send the boundary tensors on, keep the graph until ``B j``.
- ``B j``: backward of micro-batch j with the gradient from the next stage (the last stage uses its
  loss scaled by 1/accumulation), send the input gradient back.
- ``S``: optimizer step of this stage, LR schedulers, clear gradients.

Stale weights (PACI.md): the optimizer updates ``nn.Parameter(p.data)`` aliases whose ``.grad`` is
the real gradient. In-place writes through an alias do not bump the real parameter's version
counter, so a backward still in flight reads the updated weights instead of raising; no copy of a
parameter is ever made.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from lightning_paci.hollow import StageView
from lightning_paci.memory import PeakMemory
from lightning_paci.p2p import PipelineError, StageLink, report_failure
from lightning_paci.plan import Action
from lightning_paci.schedules import PlanSpec
from lightning_paci.timeline import TimelineEvent


def split_batch(batch: Any, parts: int, exact: bool) -> list[Any]:
    """Split every tensor (and list) of the batch along dim 0 into ``parts`` micro-batches."""
    flat, spec = tree_flatten(batch)
    sizes = {len(x) for x in flat if isinstance(x, (Tensor, list)) and (not isinstance(x, Tensor) or x.dim())}
    if len(sizes) != 1:
        raise ValueError(f"cannot split the batch into micro-batches: its tensors have first dimensions "
                         f"{sorted(sizes)}; every tensor of a batch needs the same batch dimension 0")
    size = sizes.pop()
    if exact and size % parts:
        raise ValueError(f"batch size {size} is not divisible by micro_batches={parts}: make the "
                         "DataLoader's batch_size a multiple of micro_batches (and use drop_last=True)")
    parts = min(parts, size)
    columns = []
    for x in flat:
        if isinstance(x, Tensor) and x.dim():
            columns.append(torch.tensor_split(x, parts))
        elif isinstance(x, list) and len(x) == size:
            step = math.ceil(size / parts)
            columns.append([x[k: k + step] for k in range(0, size, step)])
        else:
            columns.append([x] * parts)
    return [tree_unflatten([c[k] for c in columns], spec) for k in range(parts)]


class _LogCapture:
    """Collects the ``self.log`` calls of the micro-batches of one batch and logs their mean once."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.records: dict[str, list[tuple[Any, tuple, dict, int]]] = {}
        self.weight = 1

    def __enter__(self) -> _LogCapture:
        self.module.log = self._record  # instance attribute shadows LightningModule.log
        return self

    def __exit__(self, *exc: object) -> None:
        del self.module.log

    def _record(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(value, Tensor):
            value = value.detach()
        self.records.setdefault(name, []).append((value, args, kwargs, self.weight))

    def flush(self) -> None:
        for name, records in self.records.items():
            value, args, kwargs, _ = records[-1]
            if isinstance(value, (Tensor, int, float)) and len(records) > 1:
                total = sum(w for *_, w in records)
                value = sum(torch.as_tensor(v, dtype=torch.float64) * w for v, _, _, w in records) / total
                if "batch_size" in kwargs:
                    kwargs = {**kwargs, "batch_size": kwargs["batch_size"] * len(records)}
            self.module.log(name, value, *args, **kwargs)
        self.records.clear()


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
                 forward_context: Callable[[], Any] = nullcontext, clip_value: float | None = None,
                 record_timeline: bool = False) -> None:
        self.module, self.view, self.spec, self.link = module, view, spec, link
        self.stage, self.last = view.stage, view.stage == spec.n_stages - 1
        self.optimizer, self.aliases, self.schedulers = optimizer, aliases, schedulers
        self.device, self.forward_context, self.clip_value = device, forward_context, clip_value
        self.handlers = {"F": self._forward, "B": self._backward, "S": self._step}
        self.batches_since_drain = 0
        self.version = 0  # optimizer steps taken by this stage
        self._in_flight: dict[int, tuple[list[Tensor], list[Tensor], int]] = {}
        self._micro: list[Any] = []
        self._first = 0
        self._batch_idx = 0
        self._losses: list[Tensor] = []
        self._output: Any = None
        self._log = _LogCapture(module)
        self._nonfinite_seen = False
        # telemetry
        self.drift = Counter()
        self.peak_in_flight = 0
        self.busy_s = self.wall_s = 0.0
        self.time_of = {"F": [0.0, 0], "B": [0.0, 0], "S": [0.0, 0]}
        self.timeline: list[TimelineEvent] | None = [] if record_timeline else None
        self.memory = PeakMemory(device)
        self._t0 = time.perf_counter()
        self._last_end: float | None = None  # end of the previous training batch, None after a drain

    # -- entry points (called by the strategy) --------------------------------------------------------
    def train_batch(self, batch: Any, batch_idx: int) -> Any:
        k = self.batches_since_drain
        start = self._last_end if self._last_end is not None else time.perf_counter()
        steps_before = self.version
        self._micro = split_batch(batch, self.spec.micro_batches, exact=True)
        self._first, self._batch_idx, self._losses, self._output = k * self.spec.micro_batches, batch_idx, [], None
        self._run(self.spec.batch(self.stage, k), f"batch {k} since the last drain")
        self.batches_since_drain += 1
        self._last_end = time.perf_counter()
        self.wall_s += self._last_end - start  # includes the loop's time between batches: idle, not busy
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
        """Finish every backward in flight and close the window: all stages then hold equal versions."""
        if self.batches_since_drain == 0 and not self._in_flight:
            return
        self._losses = []
        start = time.perf_counter()
        self._run(self.spec.drain(self.stage, self.batches_since_drain), "drain")
        self.link.flush()
        self.wall_s += time.perf_counter() - start
        self._last_end = None
        assert not self._in_flight, f"stage {self.stage}: micro-batches {sorted(self._in_flight)} not drained"
        self.batches_since_drain = 0

    def eval_batch(self, step_name: str, batch: Any, batch_idx: int, *extra: Any) -> Any:
        """Forward-only pipelining of ``validation_step``/``test_step`` over the micro-batches."""
        self.drain()
        waited = self.link.wait_s  # evaluation is not training time: keep its waits out of telemetry
        micro = split_batch(batch, self.spec.micro_batches, exact=False)
        step = getattr(self.module, step_name)
        result = None
        with torch.no_grad():
            for part in micro:
                received = self.link.recv_activations() if self.stage > 0 else []
                self._log.weight = len(tree_flatten(part)[0][0]) if tree_flatten(part)[0] else 1
                with self._log, self.forward_context():
                    result, out = self.view.run(lambda: step(part, batch_idx, *extra), received)
                if out is not None:
                    self.link.send_activations(out)
        self._log.weight = 1
        self._log.flush()
        self.link.wait_s = waited
        return result

    # -- the table of handlers -------------------------------------------------------------------------
    def _run(self, actions: tuple[Action, ...], where: str) -> None:
        for index, action in enumerate(actions):
            handler = self.handlers.get(action.kind)
            if self.timeline is not None:
                self.link.wait_log = []
            t0, wait0 = time.perf_counter(), self.link.wait_s
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
            t1 = time.perf_counter()
            compute = (t1 - t0) - (self.link.wait_s - wait0)
            self.busy_s += compute
            self.memory.sample()
            self.time_of[action.kind][0] += compute
            self.time_of[action.kind][1] += 1
            if self.timeline is not None:
                self._record(str(action), t0, t1)

    def _record(self, label: str, t0: float, t1: float) -> None:
        """Timeline events of one action: waits for its input ("recv F3"), its compute, then send
        back-pressure ("send F3"); every handler receives before it computes and sends after."""
        waits, o = self.link.wait_log or [], self._t0
        begin = max((end for _, end, kind in waits if kind == "recv"), default=t0)
        end = min((start for start, _, kind in waits if kind == "send"), default=t1)
        if begin > t0:
            self.timeline.append(TimelineEvent(self.stage, f"recv {label}", t0 - o, begin - o))
        self.timeline.append(TimelineEvent(self.stage, label, begin - o, end - o))
        if end < t1:
            self.timeline.append(TimelineEvent(self.stage, f"send {label}", end - o, t1 - o))

    def _forward(self, j: int) -> None:
        part = self._micro[j - self._first]
        received = self.link.recv_activations() if self.stage > 0 else []
        if self.stage > 0 and j + 1 < self._first + len(self._micro):
            self.link.expect_activations()  # the batch's next forward follows: gloo receives it meanwhile
        for t in received:
            if t.is_floating_point():
                t.requires_grad_(True)
        step = self.module.training_step
        with self._log, self.forward_context():
            result, out = self.view.run(lambda: step(part, self._batch_idx), received)
        if out is not None:
            self.link.send_activations(out)
            outputs = [t for t in out if t.is_floating_point()]
            self.link.expect_grads(outputs)
        else:
            loss = _loss_of(result)
            self._losses.append(loss.detach())
            self._output = result if isinstance(result, dict) else None
            outputs = [loss / self.spec.accumulation]
        inputs = [t for t in received if t.is_floating_point()]
        self._in_flight[j] = (inputs, outputs, self.version)
        self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))

    def _backward(self, j: int) -> None:
        inputs, outputs, version = self._in_flight.pop(j)
        if self.last:
            loss = outputs[0].detach() * self.spec.accumulation
            outputs[0].backward()
        else:
            grads, loss = self.link.recv_grads(outputs)
            pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            self._losses.append(loss.squeeze(0))
        if self.stage > 0:
            self.link.send_grads([t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs], loss)
        self.drift[self.version - version] += 1

    def _step(self, _: None) -> None:
        for param, alias in self.aliases:
            alias.grad = param.grad
        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_([a for _, a in self.aliases if a.grad is not None], self.clip_value)
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
        wall = max(self.wall_s, 1e-12)
        mean = {k: (t / n if n else 0.0) for k, (t, n) in self.time_of.items()}
        return {
            "stage": self.stage,
            "max_drift": max(self.drift, default=0),
            "drift_histogram": dict(sorted(self.drift.items())),
            "utilization": self.busy_s / wall,
            "bubble_fraction": self.link.wait_s / wall,
            "peak_in_flight": self.peak_in_flight,
            "optimizer_steps": self.version,
            "peak_memory_bytes": self.memory.peak,
            "busy_s": self.busy_s,
            "wait_s": self.link.wait_s,
            "wall_s": self.wall_s,
            "forward_s": mean["F"],
            "backward_s": mean["B"],
            "step_s": mean["S"],
            "parameters": sum(p.numel() for p, _ in self.aliases),
        }

