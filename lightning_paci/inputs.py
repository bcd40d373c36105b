"""What every stage must agree on about a micro-batch: its samples and the randomness drawn around it.

Each stage process loads the batch itself and runs the user's whole training_step (hollow.py), so a
pipeline is only right if every stage reads the same samples in the same order. Nothing in the data
path guarantees that: a dataset that shards by rank (litdata, webdataset ``split_by_node``, HF
``split_dataset_by_node``), a loader that shuffles without Lightning's sampler, or augmentation seeded
by the rank (Lightning's ``seed_everything(workers=True)`` seeds workers with the global rank) give
stage 0 the inputs of one sample and the last stage the labels of another, silently.

- ``fingerprint``: a few float64 sums of a micro-batch (cheap next to one forward). It travels with
  the micro-batch's activations as one more tensor of the same message; the receiving stage compares
  it with its own copy's (``check_fingerprint``) and fails naming the stage, batch and micro-batch.
- ``SharedRandomness``: random numbers drawn in training_step outside the stage's modules (noise,
  masking) must be the same on every stage, yet the processes' generators diverge (dropout draws on
  one stage only). Each forward runs under ``torch.random.fork_rng`` seeded from (run seed, micro-batch
  number), identical on every stage; when a stage's own modules begin (the pre-hook of its first
  unit) it switches to a seed of its own, so dropout masks of different stages are not copies of each
  other. Outside the forwards the process's generator is untouched.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

FINGERPRINT_LEN = 4
_MIX = (6364136223846793005, 1442695040888963407, 0x9E3779B97F4A7C15)  # odd 64-bit constants


def fingerprint(micro_batch: Any, device: torch.device) -> Tensor:
    """(FINGERPRINT_LEN,) float64: per leaf (weighted by its position) the sum, the sum weighted by
    sample index (catches reordered samples), the sum of squares, and the element count (a CRC of
    ``repr`` for non-tensor leaves such as strings)."""
    parts = []
    for weight, leaf in enumerate(tree_flatten(micro_batch)[0], start=1):
        if isinstance(leaf, Tensor):
            rows = leaf.detach().reshape(len(leaf) if leaf.dim() else 1, -1)
            sums = rows.sum(1, dtype=torch.float64)  # float64 accumulation, no float64 copy of the batch
            squares = (torch.linalg.vector_norm(rows, dtype=torch.float64) ** 2 if rows.is_floating_point()
                       else rows.to(torch.float64).square().sum())
            index = torch.arange(1, len(sums) + 1, dtype=torch.float64, device=sums.device)
            value = torch.stack([sums.sum(), (sums * index).sum(), squares,
                                 torch.tensor(float(leaf.numel()), dtype=torch.float64, device=sums.device)])
        else:
            value = torch.tensor([0.0, 0.0, 0.0, float(zlib.crc32(repr(leaf).encode()))], dtype=torch.float64)
        parts.append(value.to(device) * weight)
    if not parts:
        return torch.zeros(FINGERPRINT_LEN, dtype=torch.float64, device=device)
    return torch.stack(parts).sum(0)


def check_fingerprint(mine: Tensor, received: Tensor, stage: int, batch_idx: int, micro: int, what: str) -> None:
    if torch.allclose(mine, received, rtol=1e-9, atol=1e-9):
        return
    raise ValueError(
        f"stage {stage} and stage {stage - 1} read different samples for micro-batch {micro} of {what} batch "
        f"{batch_idx} (fingerprints {mine.tolist()} vs {received.tolist()}): every pipeline stage must load "
        "the same batches in the same order. Likely causes: use_distributed_sampler=False with a shuffling "
        "DataLoader or sampler (keep Lightning's sampler, or give the sampler a generator seeded alike on "
        "every process); a dataset that shards by rank (litdata, webdataset split_by_node, HF "
        "split_dataset_by_node: give every stage the whole stream); augmentation or DataLoader worker seeds "
        "that depend on the rank (seed_everything(workers=True) seeds workers with the global rank: draw "
        "random augmentation in training_step instead, where every stage draws the same numbers)")


def _mix(*values: int) -> int:
    seed = 0
    for constant, value in zip(_MIX, values):
        seed = (seed + constant * (value + 1)) % 2**64
    return seed % 2**63


class SharedRandomness:
    """Seeds every forward alike on every stage; ``entry`` (the stage's first module, None on stage 0)
    switches to the stage's own seed when the stage's own compute begins."""

    def __init__(self, seed: int, stage: int, device: torch.device, entry: nn.Module | None) -> None:
        self.seed, self.stage, self.device, self.entry = seed, stage, device, entry
        self._own_seed: int | None = None

    @contextmanager
    def forward(self, kind: int, index: int) -> Iterator[None]:
        """Around the forward of micro-batch number ``index`` (counted alike on every stage) of
        ``kind`` (0 training, 1 evaluation)."""
        devices = [] if self.device.type == "cpu" else [self.device.index or 0]
        device_type = "cuda" if self.device.type == "cpu" else self.device.type
        # The hook lives for one forward only: the strategy builds a runtime per fit/validate/test.
        hook = self.entry.register_forward_pre_hook(self._enter) if self.entry is not None else None
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.manual_seed(_mix(self.seed, kind, index))
            self._own_seed = _mix(self.seed, 2 * (self.stage + 1) + kind, index)
            try:
                yield
            finally:
                self._own_seed = None
                if hook is not None:
                    hook.remove()

    def _enter(self, module: nn.Module, args: Any) -> None:
        if self._own_seed is not None:
            torch.manual_seed(self._own_seed)
            self._own_seed = None
