"""When PACI's stale forwards cost perplexity: the setup warning and the measured rule behind it.

Under PACI, stage i forwards the first N-1-i micro-batches of the next window before it steps, and
runs their backwards after the step (../shared/PACI.md). So a share s = (N-1)/a of stage 0's
micro-batches is stale, and with an Adam-family optimizer each step moves every weight by about the
learning rate, whatever the gradient's scale. [Note: staleness rule] The recipe's GPT, replayed in
one process against 1F1B-flush (``recipes/staleness_sweep.py``, BENCHMARKS.md "Learning: PACI
against flush"), ended within 1% of flush's perplexity at every seed only where

    peak_lr * s**2  <=  STALE_BOUND      (s = (N-1)/a; at N=2 and lr 2e-3 that is a >= 16)

600 steps, N = 2, medians over seeds 1337-1339: lr 2e-3 at a = 16, 8, 4: -1.3%, +2.2%, +5.5%;
lr 1e-3 at a = 8: +1.9% (every seed above 1%); lr 5e-4 at a = 8, on the bound: +0.5% (one seed).
lr/a alone does not order the runs: 1e-3 at a = 8 has the lr/a of 2e-3 at a = 16 and ends worse,
so the stale share counts more than the learning rate, hence its square. Seeds move the gap by
several percent either way, so the bound marks where the gap stops showing, not a sharp edge.
Measured at N = 2 with AdamW; N > 2 is an extrapolation through s. Other optimizers (SGD's step
scales with the gradient) are not covered, so they get no warning.
"""

from __future__ import annotations

import math
from typing import Any

# lr * s**2 of the one measured point that ended within 1% of flush at every seed (lr 2e-3, a = 16).
STALE_BOUND = 2e-3 / 16**2
ADAM_FAMILY = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "FusedAdam", "DeepSpeedCPUAdam")


def peak_lr(optimizer: Any) -> float:
    """The largest learning rate the optimizer's groups reach: a scheduler's ``max_lr``/``initial_lr``
    (set when it is built, before its warm-up factor) or else ``lr``."""
    return max(max(float(g.get("max_lr", 0.0)), float(g.get("initial_lr", 0.0)), float(g["lr"]))
               for g in optimizer.param_groups)


def staleness_advice(schedule: str, optimizer: Any, n_stages: int, micro_batches: int,
                     accumulate_grad_batches: int = 1) -> str | None:
    """The warning to give at setup, or None where the run sits inside the measured rule."""
    if schedule != "paci" or n_stages < 2 or type(optimizer).__name__ not in ADAM_FAMILY:
        return None
    lr = peak_lr(optimizer)
    a = micro_batches * accumulate_grad_batches
    stale = min(n_stages - 1, a) / a  # share of stage 0's micro-batches forwarded before a step
    if lr * stale**2 <= STALE_BOUND * (1 + 1e-9):
        return None
    a_needed = math.ceil((n_stages - 1) * math.sqrt(lr / STALE_BOUND) - 1e-9)
    needed = max(math.ceil(a_needed / accumulate_grad_batches), micro_batches + 1)
    lr_ok = STALE_BOUND / stale**2
    return (f"PACI with peak lr {lr:g}, accumulation a = micro_batches x accumulate_grad_batches = {a} and "
            f"{n_stages} stages: a share (N-1)/a = {stale:.3g} of stage 0's micro-batches is forwarded with "
            f"weights one step old, and lr x ((N-1)/a)^2 = {lr * stale**2:.3g} is above {STALE_BOUND:.3g}, the "
            "largest value at which PACI's final perplexity stayed within 1% of 1F1B-flush's in the measured "
            "sweep (medians over 3 seeds at lr 2e-3: +2.2% at a = 8, +5.5% at a = 4; BENCHMARKS.md, "
            f"'Learning: PACI against flush'). Use micro_batches >= {needed} (with a batch size divisible by "
            f"it), or a peak lr <= {lr_ok:.3g}, or schedule='1f1b' if the stale forwards must cost nothing.")
