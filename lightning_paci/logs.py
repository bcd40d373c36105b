"""What the micro-batches of one batch log and return, combined into what the whole batch gives
on one device: Lightning sees one ``self.log`` call per name and one return value per batch.

- ``self.log`` values are combined with their own ``reduce_fx`` over the micro-batches: ``"mean"``
  weighted by micro-batch size (or by the ``batch_size`` passed), ``"sum"``, ``"max"``, ``"min"``.
  This is the batch's value whenever the value logged is that reduction over the micro-batch's
  samples (a mean loss, a count of correct predictions, a largest per-sample loss).
- A torchmetrics ``Metric`` accumulates the micro-batches itself, as torchmetrics does. Its step
  value (``metric(preds, target)`` then ``self.log(name, metric)``) is the batch's: the batch's
  ``metric(...)`` calls are replayed into the metric's reset state, computed, and the state restored.
- The last stage is the only data-parallel replica, so a Metric's sync across processes is a
  no-op, as in a one-process run: Lightning calls ``compute()`` on the last stage only, and a
  torchmetrics sync would wait there for the other stages forever.
- Every value logged comes from the last stage. Other stages run the module's hooks too (a Metric
  logged in ``on_train_epoch_end`` computes there on an empty state); their ``self.log`` calls are
  dropped, and PipelineSync copies the last stage's metrics to them for callbacks.
- ``validation_step``/``test_step`` return values: see ``batches.combine_outputs``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from torchmetrics import Metric

_LOG_SIGNATURE = inspect.signature(LightningModule.log)
_REDUCTIONS = {"mean": "mean", "avg": "mean", torch.mean: "mean", "sum": "sum", torch.sum: "sum", sum: "sum",
               "max": "max", torch.max: "max", max: "max", "min": "min", torch.min: "min", min: "min"}


def _single_replica() -> bool:
    return False  # torchmetrics' distributed_available_fn: no other replica to sync with


def _dropped(*args: Any, **kwargs: Any) -> None:
    """``self.log`` on a stage other than the last: its values are not the model's."""


class LogCapture:
    """Collects the ``self.log`` calls of the micro-batches of one batch (``with capture:`` around each)
    and logs each name once per batch in ``flush``."""

    def __init__(self, module: nn.Module, last: bool) -> None:
        self.module = module
        if not last:
            module.log = _dropped  # instance attribute shadows LightningModule.log (log_dict calls it)
        self.records: dict[str, list[tuple[Any, dict[str, Any], int]]] = {}
        self.weight = 1  # samples in the current micro-batch, where they may differ (evaluation)
        self.metrics = [m for m in module.modules() if isinstance(m, Metric)]
        for metric in self.metrics:
            metric.distributed_available_fn = _single_replica
        self._calls: dict[int, list[tuple[tuple, dict]]] = {}  # id(metric) -> this batch's metric(...) calls
        self._hooks: list[Any] = []
        self._outer: Any = None

    def __enter__(self) -> LogCapture:
        self._outer = self.module.__dict__.get("log")
        self.module.log = self._record
        self._hooks = [m.register_forward_pre_hook(self._remember, with_kwargs=True) for m in self.metrics]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._outer is None:
            del self.module.log
        else:
            self.module.log = self._outer
        for hook in self._hooks:
            hook.remove()

    def _remember(self, metric: nn.Module, args: tuple, kwargs: dict) -> None:
        detach = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
        self._calls.setdefault(id(metric), []).append((tree_map(detach, args), tree_map(detach, kwargs)))

    def _record(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        bound = _LOG_SIGNATURE.bind(self.module, name, value, *args, **kwargs).arguments
        options = {k: v for k, v in bound.items() if k not in ("self", "name", "value")}
        if isinstance(value, Tensor):
            value = value.detach()
        weight = options.get("batch_size") or self.weight
        self.records.setdefault(name, []).append((value, options, weight))

    def flush(self) -> None:
        for name, records in self.records.items():
            value, options, _ = records[-1]
            if isinstance(value, Metric):
                _batch_value(value, self._calls.get(id(value), []))
            elif len(records) > 1 and all(isinstance(v, (Tensor, int, float)) for v, _, _ in records):
                value, options = _reduce(records, options)
            self.module.log(name, value, **options)
        self.records.clear()
        self._calls.clear()


def _reduce(records: list[tuple[Any, dict[str, Any], int]], options: dict[str, Any]) -> tuple[Any, dict]:
    reduce_fx = options.get("reduce_fx", "mean")
    reduction = _REDUCTIONS.get(reduce_fx.lower() if isinstance(reduce_fx, str) else reduce_fx)
    if reduction is None:
        return records[-1][0], options  # Lightning itself refuses other reductions, with its message
    values = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v, _, _ in records])
    if reduction == "sum":
        return values.sum(0), options
    if reduction in ("max", "min"):
        return getattr(values, reduction)(0).values, options
    weights = torch.tensor([float(w) for *_, w in records], dtype=torch.float64, device=values.device)
    if options.get("batch_size"):
        options = {**options, "batch_size": int(sum(w for *_, w in records))}
    return (values * weights).sum(0) / weights.sum(), options


def _batch_value(metric: Metric, calls: list[tuple[tuple, dict]]) -> None:
    """Set ``metric``'s step value (what Lightning logs on_step) to its value over the whole batch.

    torchmetrics' own forward computes a call's value on a reset state and merges it into the
    accumulated one; this does the same over every ``metric(...)`` call of the batch. The accumulated
    state (of the metric and any metric it wraps) is put back untouched.
    """
    if not calls:
        return  # only update() was called: no step value, as on one device
    nested = [m for m in metric.modules() if isinstance(m, Metric)]
    saved = [({a: getattr(m, a) for a in m._defaults}, m._update_count, m._computed) for m in nested]
    try:
        metric.reset()
        with torch.no_grad():
            for args, kwargs in calls:
                metric.update(*args, **kwargs)
            value = metric.compute()
    finally:
        for m, (state, count, computed) in zip(nested, saved):
            for attr, tensor in state.items():
                setattr(m, attr, tensor)
            m._update_count, m._computed = count, computed
    metric._forward_cache = value


def share_callback_metrics(trainer: Any, rank: int, broadcast: Any) -> None:
    """Collective: the last stage's (rank 0's) scalar callback metrics copied to every stage, so that
    ModelCheckpoint and EarlyStopping decide alike everywhere."""
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()
               if isinstance(v, Tensor) and v.numel() == 1} if rank == 0 else None
    metrics = broadcast(metrics, src=0)
    if rank != 0:
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
