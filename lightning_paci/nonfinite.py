"""Which windows a stage skips under ``skip_nonfinite_windows``, decided without a collective.

A window (the micro-batches one optimizer step averages) is bad on stage i when the loss of one of
its micro-batches is non-finite, or stage i's accumulated gradients are, or the flag that came back
with a gradient message of the window from stage i+1 says so. Stage i sends the window's flag so far
with each input gradient it sends back, so the flag rides upstream inside the pipeline's own messages:

- a non-finite loss (last stage) skips the window on every stage;
- non-finite gradients on stage i alone skip it on stages 0..i; stages after i stepped it already,
  with their own finite gradients (they cannot wait for upstream without a message going the
  other way, i.e. a synchronisation this option is meant to avoid).

With weights tied across stages (tied.py) the step checks the summed gradients again, so a stage
whose tied copy received a non-finite gradient skips the window too. Under PACI only the owner's
sum changes at its step; a holder checked its own share already (it is among its gradients).

Every stage's windows hold the same micro-batches (a step follows the backward that completes one,
in micro-batch order, on every stage), so "the window" means the same thing on both ends of a
message. The checks are device ops; the host learns the verdict once per window, at the step.
"""

from __future__ import annotations

import warnings

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor


def warn_nonfinite_loss(losses: Tensor, stage: int, first: int, batch_idx: int, steps_before: int) -> bool:
    """Without ``skip_nonfinite_windows``: say once, where it first happens, that a non-finite loss entered
    the pipeline (one host sync per batch on the last stage): its gradients reach every stage and nothing
    skips them. ``losses``: the batch's micro-batch losses, the first being micro-batch ``first``."""
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    if bad:
        rank_zero_warn(f"lightning_paci: stage {stage} computed a non-finite loss ({losses[bad[0]].item()}) for "
                       f"micro-batch {first + bad[0]} (batch_idx {batch_idx}, after {steps_before} optimizer "
                       "steps of this stage); its gradients reach every stage, and each stage's next step makes "
                       "its weights non-finite (skip_nonfinite_windows=True skips such windows instead)")
    return bool(bad)


class WindowGuard:
    """One stage's non-finite verdict for the window it is accumulating; inert when not ``enabled``."""

    def __init__(self, stage: int, device: torch.device, enabled: bool) -> None:
        self.stage, self.enabled = stage, enabled
        self.skipped = 0  # windows skipped by this stage (telemetry's skipped_windows)
        self._finite = torch.zeros((), dtype=torch.float64, device=device)
        self._bad: Tensor | None = None  # 0-d bool on the device: the window so far is bad
        self._gradients_checked = False  # this stage's accumulated gradients were checked for the window

    def _add(self, bad: Tensor) -> None:
        self._bad = bad if self._bad is None else self._bad | bad

    def loss(self, loss: Tensor) -> None:
        """The last stage's loss of one micro-batch of the window."""
        if self.enabled:
            self._add(~torch.isfinite(loss.detach()).all())

    def arrived(self, flag: Tensor) -> None:
        """The flag that came back with one micro-batch's gradient (the next stage's verdict so far)."""
        if self.enabled:
            self._add(flag != 0)

    def gradients(self, grads: list[Tensor]) -> None:
        """Check this stage's accumulated gradients (after the window's last backward: once a window)."""
        if self.enabled:
            self._gradients_checked = True
            if grads:  # the largest magnitude: inf for an inf, nan for a nan, never an overflow of a sum
                self._add(~torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))))

    def flag(self) -> Tensor:
        """What goes back with the next gradient message: 1.0 when the window so far is bad."""
        if not self.enabled or self._bad is None:
            return self._finite
        return self._bad.to(torch.float64)

    def backward_done(self) -> None:
        """A backward changed the gradients: a check before it no longer covers them."""
        self._gradients_checked = False

    def skip(self, grads: list[Tensor], micro_batch: int | None) -> bool:
        """At the window's step: whether to skip it (one host sync). Starts the next window."""
        if not self.enabled:
            return False
        if not self._gradients_checked:  # a step whose last backward ran in an earlier program
            self.gradients(grads)
        bad, self._bad, self._gradients_checked = self._bad, None, False
        if bad is None or not bool(bad):
            return False
        self.skipped += 1
        if self.skipped == 1:
            warnings.warn(f"lightning_paci: stage {self.stage} skips the window ending at micro-batch "
                          f"{micro_batch} (a non-finite loss or gradient; skip_nonfinite_windows=True): no "
                          "optimizer step, its gradients dropped. Skipped windows are counted in telemetry "
                          "(skipped_windows)",
                          stacklevel=2)
        return True
