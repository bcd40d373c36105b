"""When PACI's stale forwards cost perplexity: the setup warning and the measured rule behind it.

Under PACI, stage i forwards the first N-1-i micro-batches of the next window before it steps, and
runs their backwards after the step (../shared/PACI.md). With an Adam-family optimizer every step
moves each weight by about the learning rate, whatever the gradient's scale, so the error these
micro-batches carry grows with the peak learning rate and with the share (N-1)/a of stage 0's
micro-batches that are stale. [Note: staleness rule] The recipe's GPT, replayed in one process
against 1F1B-flush with three seeds (``recipes/staleness_sweep.py``, BENCHMARKS.md "Learning: PACI
against flush"), ended within 1% of flush's perplexity at every seed only where

    peak_lr * (N - 1) / a  <=  LR_OVER_A_WITHIN_1PCT

(600 steps at lr 2e-3: m=16 -1.3% median, seeds -1.6 to +0.9%; m=8 +2.2%, -3.1 to +5.2%; m=4 +5.5%,
+0.7 to +8.3%). Seeds move the gap by several percent either way, so the bound is where the gap
stops showing, not a sharp edge. Measured at N = 2 with AdamW; (N-1)/a is the stale share at more
stages, an extrapolation. Other optimizers (SGD's step scales with the gradient) are not covered,
so they get no warning.
"""

from __future__ import annotations

import math
from typing import Any

# Largest measured lr/a (N=2) at which PACI ended within 1% of flush at every seed: see the Note above.
LR_OVER_A_WITHIN_1PCT = 1.25e-4
ADAM_FAMILY = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "FusedAdam", "DeepSpeedCPUAdam")


def peak_lr(optimizer: Any) -> float:
    """The largest learning rate the optimizer's groups reach: a scheduler's ``max_lr``/``initial_lr``
    (set when it is built, before its warm-up factor) or else ``lr``."""
    return max(max(float(g.get("max_lr", 0.0)), float(g.get("initial_lr", 0.0)), float(g["lr"]))
               for g in optimizer.param_groups)


def staleness_advice(schedule: str, optimizer: Any, n_stages: int, micro_batches: int,
                     accumulate_grad_batches: int = 1) -> str | None:
    """The warning to give at setup, or None when the run sits where PACI measured within 1% of flush."""
    if schedule != "paci" or n_stages < 2 or type(optimizer).__name__ not in ADAM_FAMILY:
        return None
    lr = peak_lr(optimizer)
    a = micro_batches * accumulate_grad_batches
    stale = min(n_stages - 1, a) / a  # share of stage 0's micro-batches forwarded before a step
    if lr * stale <= LR_OVER_A_WITHIN_1PCT * (1 + 1e-9):
        return None
    # The smallest micro_batches that brings lr * (N-1) / a to the measured bound.
    needed = math.ceil(lr * (n_stages - 1) / (LR_OVER_A_WITHIN_1PCT * accumulate_grad_batches) - 1e-9)
    needed = max(needed, micro_batches + 1)
    lr_ok = LR_OVER_A_WITHIN_1PCT * a / min(n_stages - 1, a)
    return (f"PACI with peak lr {lr:g}, accumulation a = micro_batches x accumulate_grad_batches = {a} and "
            f"{n_stages} stages: lr x (N-1)/a = {lr * stale:.3g}, above {LR_OVER_A_WITHIN_1PCT:g}, the largest "
            "value at which PACI's final perplexity stayed within 1% of 1F1B-flush's in the measured sweep "
            "(median +2.2% at 2.5e-4 and +5.5% at 5e-4 over 3 seeds; BENCHMARKS.md, 'Learning: PACI against "
            "flush'). Use "
            f"micro_batches >= {needed} (with a batch size divisible by it), or a peak lr <= {lr_ok:.3g}, "
            "or schedule='1f1b' if the stale forwards must cost nothing.")
