"""PACI's tied copies in one process, stated for the replays (tests/reference.py, tests/models_hf.py)
independently of lightning_paci/tied.py.

The owner stage's parameter is the one stepped weight: at its step w it adds the holder stage's share
of window w (what the holder's copy accumulated) to its own gradient. The holder's copy is a separate
tensor that its optimizer never steps (it leaves the stage's parameter list); at its step w it takes
the weight the owner had after its step ``w - lag``, if that step came after the last drain; at a
drain it takes the owner's latest weight.
"""

from __future__ import annotations

import torch
from torch import nn


class TiedReplay:
    def __init__(self, owner: nn.Parameter, holder: nn.Parameter, owner_stage: int, holder_stage: int,
                 lag: int) -> None:
        self.owner, self.holder, self.stages, self.lag = owner, holder, (owner_stage, holder_stage), lag
        self.shares: dict[int, torch.Tensor] = {}
        self.weights: list[torch.Tensor] = []  # the owner's weight after each of its steps
        self.since = 0  # steps at the last drain

    def ready(self, stage: int, w: int) -> bool:
        """Whether stage's step w has what it needs (the share; the weight to install)."""
        if stage == self.stages[0]:
            return w in self.shares
        if stage == self.stages[1]:
            return w - self.lag < self.since or w - self.lag < len(self.weights)
        return True

    def before_step(self, stage: int, w: int) -> None:
        if stage == self.stages[0]:
            share = self.shares.pop(w)
            self.owner.grad = share if self.owner.grad is None else self.owner.grad + share
        elif stage == self.stages[1]:
            self.shares[w] = self.holder.grad if self.holder.grad is not None else torch.zeros_like(self.holder)
            self.holder.grad = None

    def after_step(self, stage: int, w: int) -> None:
        if stage == self.stages[0]:
            self.weights.append(self.owner.detach().clone())
        elif stage == self.stages[1] and w - self.lag >= self.since:
            self.holder.data.copy_(self.weights[w - self.lag])

    def drained(self) -> None:
        if self.weights:
            self.holder.data.copy_(self.weights[-1])
        self.since = len(self.weights)
