"""Models bigger than one process: build on the meta device, give each stage only its own tensors.

A LightningModule that builds its layers in ``configure_model`` (Lightning's hook for large models)
gets them on the meta device under PACIStrategy (``model_sharded_context``): no memory, and with
``start_method="spawn"`` nothing big to pickle to the workers. After the split, each stage
materializes the modules it owns and leaves the others hollow, so a stage holds its share of the
model and never the whole.

Initialization, as Lightning's FSDP strategy does it: ``to_empty`` then the module's own
``reset_parameters()`` (a module with tensors but no ``reset_parameters`` gets a warning: its memory
is uninitialised; load a checkpoint, ``ckpt_path=``, or give it one). Each module draws from a
random stream of its own, seeded from torch's initial seed and the module's name, so its weights do
not depend on which stage owns it or on how the model is split: ``materialize`` on the whole
module in one process gives the same weights as the pipeline's stages together.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn


def has_meta_tensors(module: nn.Module, recurse: bool = True) -> bool:
    return any(t.is_meta for t in (*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)))


def materialize(module: nn.Module, device: torch.device, skip: Iterable[str] = ()) -> list[str]:
    """Materialize every submodule of ``module`` holding meta tensors, except those under the names
    in ``skip`` (other stages' units); returns the names of the modules left uninitialised."""
    skip = tuple(skip)
    seed = torch.initial_seed()
    uninitialised = []
    for name, sub in module.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip) or not has_meta_tensors(sub, recurse=False):
            continue
        sub.to_empty(device=device, recurse=False)
        reset = getattr(sub, "reset_parameters", None)
        if not callable(reset):
            uninitialised.append(name)
            continue
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed((seed + zlib.crc32(name.encode())) % 2**63)
            if device.type == "cuda":
                torch.cuda.manual_seed((seed + zlib.crc32(name.encode())) % 2**63)
            reset()
    if uninitialised:
        rank_zero_warn(f"lightning_paci: {', '.join(uninitialised)} built on the meta device have no "
                       "reset_parameters(): their tensors are uninitialised memory. Give them one, or load "
                       "weights (Trainer.fit(ckpt_path=...))")
    return uninitialised
