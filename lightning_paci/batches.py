"""A batch cut into micro-batches, and the micro-batches' results joined into the batch's.

``split_batch`` cuts along the batch dimension (``torch.tensor_split``'s boundaries), following the
batch's structure; ``combine_outputs`` (validation/test results) and ``join_predictions``
(``predict_step`` results) are its inverses for what the steps return, so Lightning sees one value
per batch, as on one device.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten


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


def join_predictions(results: list[Any], sizes: list[int]) -> Any:
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


def combine_outputs(step_name: str, results: list[Any], sizes: list[int]) -> Any:
    """One batch's ``validation_step``/``test_step`` result from its micro-batches' results.

    Leaf by leaf (dicts, lists and tuples keep their structure): a tensor whose first dimension is the
    micro-batch's size is per-sample and is concatenated along it, in micro-batch order; a scalar
    (0-dim tensor or number) is averaged weighted by micro-batch size, so a mean loss stays the batch's
    mean; any other leaf (a string, None) must be the same for every micro-batch. Anything else raises.
    """
    if len(results) == 1:
        return results[0]
    flat = [tree_flatten(r) for r in results]
    if any(spec != flat[0][1] for _, spec in flat):
        raise ValueError(f"{step_name} returned differently structured results for the micro-batches of one "
                         "batch; return the same keys and types for every batch")
    leaves = [_combine_leaf(step_name, [f[k] for f, _ in flat], sizes) for k in range(len(flat[0][0]))]
    return tree_unflatten(leaves, flat[0][1])


def _combine_leaf(step_name: str, values: list[Any], sizes: list[int]) -> Any:
    if all(isinstance(v, Tensor) and v.dim() and len(v) == n for v, n in zip(values, sizes)):
        return torch.cat(values)
    if all(isinstance(v, (Tensor, int, float)) and not isinstance(v, bool) and torch.as_tensor(v).dim() == 0
           for v in values):
        weights = torch.tensor(sizes, dtype=torch.float64)
        total = sum(torch.as_tensor(v, dtype=torch.float64).cpu() * w for v, w in zip(values, weights))
        mean = total / weights.sum()
        first = values[0]
        if not isinstance(first, Tensor):
            return mean.item()
        return mean.to(first.device, first.dtype if first.is_floating_point() else torch.float64)
    if not any(isinstance(v, Tensor) for v in values) and all(v == values[0] for v in values):
        return values[0]
    shapes = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in values]
    raise ValueError(f"{step_name} returned {shapes} for micro-batches of {sizes} samples; the pipeline "
                     "returns the batch's result by concatenating per-sample tensors (batch dimension first) "
                     "and averaging scalars: return per-sample tensors, scalars, or values equal for every "
                     "micro-batch")
