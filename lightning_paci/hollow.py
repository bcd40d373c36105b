"""Running the user's own training_step on every stage while each stage computes only its part.

Every process keeps the user's whole module tree, but units of other stages are *hollow*: their
parameters live on the meta device (no memory) and their forward computes only output shapes.

- Stage i > 0 starts a micro-batch in the *meta prefix*: the user's code runs on meta tensors
  (free) until the first unit of stage i is called; its pre-hook swaps the meta inputs for the
  activations received from stage i-1 and ends the prefix. A TorchFunctionMode moves real tensors
  to meta when user code mixes them with meta ones inside the prefix (``tok_emb + pos_emb``).
- Stage i < N-1 stops the micro-batch at the pre-hook of the first unit of stage i+1 by raising
  ``StageOutput`` carrying that unit's inputs: exactly what stage i+1 substitutes.
- The last stage runs to the end of training_step, so the loss and every ``self.log`` are the
  user's own.

Out-of-order use is caught, not silently miscomputed: a hollow unit called after the prefix ended
(a module reused later in forward, e.g. tied weights) or an owned unit fed meta tensors raises a
``PartitionError`` that names the module and suggests split_points.

Meta tensors must never reach real compute: torch runs ``cpu_tensor @ meta_tensor`` and returns
garbage on the CPU, without an error. So hollow parameters and buffers, and what hollow units
return, are *marked* tensors (``_Marked`` subclasses, still on meta). Torch calls them only when
they take part, i.e. in the prefix (shape inference) or by mistake: the stage's own compute pays
nothing. Outside the prefix an op mixing a marked tensor with a real one raises a
``PartitionError`` naming the parameter or module it came from (``x @ emb.weight.T`` with the
embedding on another stage: weight tying inside the forward); ops on marked tensors alone
(``.T``, ``.is_meta``, ``state_dict``) stay allowed and keep the mark. Every meta tensor the prefix
computes is marked too (``torch.arange(T, device=x.device)`` with ``x`` hollow).

Tensors computed once in the prefix and handed to several modules (GPT-2's ``position_ids``,
attention masks, Llama's RoPE ``(cos, sin)``) are *carried*: the previous stage sends every tensor
argument of this stage's first unit, and the pre-hook remembers which meta tensor each received
one replaces. Every later module of the stage, and the hook that ends the stage, swaps those same
meta tensors (by identity: the user's code passes the same object to every block) for the received
values. A meta tensor that did not cross (used by a later block only) raises a ``PartitionError``
naming the module, the argument and the boundary.

Shared units (partition.py: no parameters, no persistent buffers) are never hollow: each stage runs
them itself, on meta in the prefix and for real after it, wherever the forward calls them.

``StageOutput`` derives from ``BaseException`` so that a user's ``except Exception`` around a call of
the model (a fallback path, a retry) cannot swallow the end of a stage's forward.
A call of the whole model outside ``run`` (Lightning's model summary with ``example_input_array``)
runs as one long prefix: every unit on meta, no stage boundary, shapes only. Each process lacks
the other stages' weights, so values are not available; layer input and output sizes, all a
summary reports, are those of one device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from lightning_paci.partition import is_shared_unit


class PartitionError(RuntimeError):
    """The model's forward does not follow the stage split."""


class StageOutput(BaseException):
    """Raised at the next stage's first unit; carries the tensors that cross the boundary. A
    BaseException: user code catching ``Exception`` around the model call must let it through."""

    def __init__(self, tensors: list[Tensor]) -> None:
        super().__init__("stage output")
        self.tensors = tensors


class _Marked:
    """A meta tensor held for another stage; ``_origin`` says where it comes from."""

    _origin: str | None = None
    _view: StageView | None = None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            marked = next((t for t in flat if isinstance(t, _Marked) and t._view is not None), None)
            if marked is not None and not marked._view.prefix.active and any(
                    isinstance(t, Tensor) and not t.is_meta for t in flat):
                raise marked._view.meta_reached_compute(marked._origin, func)
            out = func(*args, **kwargs)
        if marked is None:
            return out
        inputs = {id(t) for t in flat}  # in-place ops return an input: keep it as it is
        leaves, spec = tree_flatten(out)
        return tree_unflatten([_mark(t, marked._origin, marked._view)
                               if isinstance(t, Tensor) and id(t) not in inputs else t for t in leaves], spec)


class _MarkedTensor(_Marked, Tensor):
    pass


class _MarkedParameter(_Marked, nn.Parameter):
    pass


def _mark(t: Tensor, origin: str, view: StageView) -> Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        if not t.is_meta:
            return t
        marked = t.as_subclass(_MarkedTensor)
    marked._origin, marked._view = origin, view
    return marked


def _to_meta(tree: Any) -> Any:
    flat, spec = tree_flatten(tree)
    return tree_unflatten([t.to("meta") if isinstance(t, Tensor) and not t.is_meta else t for t in flat],
                          spec)


def _argument(args: tuple, kwargs: dict, index: int) -> str:
    """How the ``index``-th flat leaf of ``(args, kwargs)`` is passed: ``args[0]``, ``position_embeddings[1]``."""
    paths, _ = tree_flatten_with_path((args, kwargs))
    top, first, *rest = paths[index][0]  # (args, kwargs) index, then the position or keyword
    name = f"args[{first.idx}]" if top.idx == 0 else str(first.key)
    return name + keystr(tuple(rest))


def _signature(training: bool, flat: list[Any]) -> tuple | None:
    """What a hollow unit's output shapes depend on; None if an argument is not simple to compare."""
    key: list[Any] = [training]
    for leaf in flat:
        if isinstance(leaf, Tensor):
            key.append((tuple(leaf.shape), leaf.dtype))
        elif isinstance(leaf, (int, float, str, bool, type(None))):
            key.append(leaf)
        else:
            return None
    return tuple(key)


class MetaPrefix(TorchFunctionMode):
    """While ``active``, any torch call mixing meta and real tensors runs entirely on meta.

    ``begin`` pushes the mode and ``end`` pops it as soon as the prefix is over, so the stage's own
    compute runs without it: a pushed mode sends every torch call through Python dispatch, 5% of a
    GPT stage's forward even when it does nothing (measured, benchmark config). Mid-forward it pops
    only when it is the innermost mode; ``end(final=True)`` after the micro-batch pops it anyway.
    """

    def __init__(self, view: StageView | None = None) -> None:
        super().__init__()
        self.active = False
        self._pushed = False
        self._view = view

    def begin(self) -> None:
        self.active = True
        self.__enter__()
        self._pushed = True

    def end(self, final: bool = False) -> None:
        self.active = False
        if self._pushed and (final or _innermost_mode() is self):
            self.__exit__(None, None, None)
            self._pushed = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch protocol
        kwargs = kwargs or {}
        if self.active:
            flat, _ = tree_flatten((args, kwargs))
            tensors = [t for t in flat if isinstance(t, Tensor)]
            if any(t.is_meta for t in tensors) and not all(t.is_meta for t in tensors):
                args, kwargs = _to_meta((args, kwargs))
            out = func(*args, **kwargs)
            if self._view is None:
                return out
            # Unmarked meta results (a factory given device=meta, an op on unmarked meta inputs) get a
            # mark, so that using one in real compute after the prefix fails instead of reading garbage.
            leaves, spec = tree_flatten(out)
            if not any(isinstance(t, Tensor) and t.is_meta and not isinstance(t, _Marked) for t in leaves):
                return out
            origin = (f"a tensor computed by {getattr(func, '__name__', func)} before stage {self._view.stage} "
                      f"began at {self._view.entry}")
            return tree_unflatten([_mark(t, origin, self._view) if isinstance(t, Tensor) and not
                                   isinstance(t, _Marked) else t for t in leaves], spec)
        return func(*args, **kwargs)


def _innermost_mode() -> Any:
    current = getattr(torch.overrides, "_get_current_function_mode", None)  # private: absent -> never early
    return current() if current is not None else None


class StageView:
    """Hooks that turn one process's copy of the model into stage ``stage`` of the pipeline."""

    def __init__(self, model: nn.Module, units: dict[str, int], stage: int, n_stages: int) -> None:
        self.model, self.stage, self.n_stages = model, stage, n_stages
        self.prefix = MetaPrefix(self)
        self._received: list[Tensor] | None = None
        # id(meta tensor of the prefix) -> (that tensor, the value received for it), this micro-batch
        self._carried: dict[int, tuple[Tensor, Tensor]] = {}
        self._modules = dict(model.named_modules())
        self._handles = []
        self.shared = {name for name in units if is_shared_unit(self._modules[name])}
        self._running = False  # inside run(): a micro-batch of the pipeline, else a shapes-only call
        self._shapes_only = False
        self._handles.append(model.register_forward_pre_hook(self._whole_call_begins))
        self._handles.append(model.register_forward_hook(self._whole_call_ends, always_call=True))
        first_of = {}
        for name, s in units.items():
            if name not in self.shared:
                first_of.setdefault(s, name)
        self.entry = first_of[stage] if stage > 0 else None
        self.exit = first_of[stage + 1] if stage + 1 < n_stages else None
        for name, s in units.items():
            module = self._modules[name]
            if name in self.shared:
                self._handles.append(module.register_forward_pre_hook(self._check_real(name, shared=True),
                                                                      with_kwargs=True))
            elif s == stage:
                hook = self._enter if name == self.entry else self._check_real(name)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            else:
                module.to("meta")
                self._mark_tensors(name, s, module)
                # A torch.compile'd unit infers shapes with its original module: dynamo has nothing to
                # gain on meta, and would trace the marked tensors' __torch_function__.
                module.forward = self._hollow_forward(name, s, getattr(module, "_orig_mod", module).forward)
                if name == self.exit:
                    self._handles.append(module.register_forward_pre_hook(self._leave, with_kwargs=True))

    def _mark_tensors(self, name: str, owner: int, module: nn.Module) -> None:
        """Swap the hollow unit's (meta) parameters and buffers for marked ones."""
        for sub_name, sub in module.named_modules(prefix=name):
            for key, p in list(sub._parameters.items()):
                if p is not None and not isinstance(p, _Marked):
                    marked = _MarkedParameter(p.data, requires_grad=p.requires_grad)
                    marked._origin, marked._view = f"parameter {sub_name}.{key} (stage {owner})", self
                    sub._parameters[key] = marked
            for key, b in list(sub._buffers.items()):
                if b is not None and not isinstance(b, _Marked):
                    sub._buffers[key] = _mark(b, f"buffer {sub_name}.{key} (stage {owner})", self)

    def meta_reached_compute(self, origin: str | None, func: Any) -> PartitionError:
        op = getattr(func, "__name__", str(func))
        return PartitionError(
            f"{origin}, held by another stage's process (here a meta tensor without values), reached "
            f"real compute ({op}) on stage {self.stage}: the forward uses it outside the module that owns "
            "it, e.g. weight tying inside the forward (x @ emb.weight.T) or a tensor computed by another "
            "stage's module used after this stage began. Untie it (give this stage its own copy), or pass "
            "split_points that keep its uses on one stage")

    def run(self, fn: Callable[[], Any], received: list[Tensor]) -> tuple[Any, list[Tensor] | None]:
        """Run one micro-batch of user code; returns (its result, None) or (None, tensors to send)."""
        self._received, self._running = received, True
        try:
            if self.stage == 0:
                return self._call(fn)
            self.prefix.begin()
            try:
                result = self._call(fn)
            finally:
                self.prefix.end(final=True)
                self._carried = {}
        finally:
            self._running = False
        if self._received is not None:
            raise PartitionError(f"stage {self.stage} never reached its first module {self.entry}: the "
                                 "forward did not call it; pass split_points naming modules it calls")
        return result

    def _call(self, fn: Callable[[], Any]) -> tuple[Any, list[Tensor] | None]:
        try:
            return fn(), None
        except StageOutput as out:
            return None, out.tensors

    # -- hooks ---------------------------------------------------------------------------------------
    def _whole_call_begins(self, module: nn.Module, args: tuple) -> None:
        if not self._running and not self._shapes_only:
            self._shapes_only = True
            self.prefix.begin()

    def _whole_call_ends(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._shapes_only:
            self._shapes_only = False
            self.prefix.end(final=True)

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._shapes_only:
            return None
        if self._received is None:
            raise PartitionError(f"{self.entry}, the first module of stage {self.stage}, ran twice in one "
                                 "forward; a stage must start at a module called once per forward")
        flat, spec = tree_flatten((args, kwargs))
        slots = [k for k, t in enumerate(flat) if isinstance(t, Tensor)]
        if len(slots) != len(self._received):
            raise PartitionError(f"stage {self.stage} received {len(self._received)} tensors but "
                                 f"{self.entry} takes {len(slots)}")
        for k, t in zip(slots, self._received):
            if tuple(flat[k].shape) != tuple(t.shape) or flat[k].dtype != t.dtype:
                raise PartitionError(
                    f"boundary stage {self.stage - 1} -> {self.stage} at {self.entry}: its argument "
                    f"{_argument(args, kwargs, k)} should be {tuple(flat[k].shape)} {flat[k].dtype} (as "
                    f"this stage computes it) but stage {self.stage - 1} sent {tuple(t.shape)} {t.dtype}; "
                    "the model's forward must build the same shapes on every stage")
            if flat[k].is_meta:
                self._carried[id(flat[k])] = (flat[k], t)
            flat[k] = t
        self._received = None
        self.prefix.end()
        return tree_unflatten(flat, spec)

    def _leave(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._shapes_only:
            return
        if self.prefix.active:
            raise PartitionError(f"{self.exit} (stage {self.stage + 1}) was called before stage "
                                 f"{self.stage} began at {self.entry}: the forward calls modules out of "
                                 "registration order; pass split_points in execution order")
        flat = self._substitute(args, kwargs, f"{self.exit}, where stage {self.stage + 1} begins")
        raise StageOutput([t for t in flat if isinstance(t, Tensor)])

    def _substitute(self, args: tuple, kwargs: dict, where: str) -> list[Any]:
        """The flat arguments with carried tensors swapped in; raises if a meta tensor is left."""
        flat, _ = tree_flatten((args, kwargs))
        for k, t in enumerate(flat):
            if isinstance(t, Tensor) and t.is_meta:
                carried = self._carried.get(id(t))
                if carried is None or carried[0] is not t:
                    raise PartitionError(
                        f"argument {_argument(args, kwargs, k)} of {where} on stage {self.stage} is a tensor "
                        f"computed before this stage began at {self.entry} (by another stage's modules, or "
                        f"from their outputs), and it is not an input of {self.entry}, so it did not cross "
                        f"the boundary from stage {self.stage - 1}. Pass it to {self.entry} as well, or "
                        f"choose split_points so that the modules using it start the stage")
                flat[k] = carried[1]
        return flat

    def _check_real(self, name: str, shared: bool = False) -> Callable:
        def check(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            flat, spec = tree_flatten((args, kwargs))
            if self._shapes_only or not any(isinstance(t, Tensor) and t.is_meta for t in flat):
                return None
            if self.prefix.active:
                if shared:  # a shared unit in the prefix computes shapes, like the rest of the prefix
                    return None
                raise PartitionError(
                    f"{name} (stage {self.stage}) was called before {self.entry or 'the stage'} began: the "
                    "forward calls modules out of registration order; reorder the submodules' "
                    "registration or pass split_points")
            return tree_unflatten(self._substitute(args, kwargs, name), spec)
        return check

    def _hollow_forward(self, name: str, owner: int, forward: Callable) -> Callable:
        cache: dict[Any, Any] = {}

        def hollow(*args: Any, **kwargs: Any) -> Any:
            if not self.prefix.active:
                raise PartitionError(
                    f"{name} belongs to stage {owner} but was called while stage {self.stage} computes: "
                    f"a module used in two places of the forward (tied or reused weights) or modules "
                    "called out of registration order; untie it or pass split_points that keep its uses on "
                    "one stage")
            flat, _ = tree_flatten((args, kwargs))
            key = _signature(self._modules[name].training, flat)
            if key is None or key not in cache:  # shape inference once per input signature
                with torch.no_grad():
                    out = forward(*_to_meta(args), **_to_meta(kwargs))
                leaves, spec = tree_flatten(out)
                out = tree_unflatten([_mark(t, f"the output of {name} (stage {owner})", self)
                                      if isinstance(t, Tensor) else t for t in leaves], spec)
                if key is None:
                    return out
                cache[key] = out
            return cache[key]
        return hollow
