"""The setup warning for PACI runs where stale forwards were measured to cost more than 1% perplexity
(lightning_paci/advice.py). Unit level: no processes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_paci.advice import STALE_BOUND, peak_lr, staleness_advice


def adamw(lr: float, warmup: bool = False) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=lr)
    if warmup:  # the recipe's shape: LambdaLR starting near 0; the peak sits in initial_lr
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 30)
    return opt


def test_peak_lr_is_read_before_the_warmup_factor():
    opt = adamw(2e-3, warmup=True)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 / 30)
    assert peak_lr(opt) == pytest.approx(2e-3)
    one_cycle = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1.0)
    torch.optim.lr_scheduler.OneCycleLR(one_cycle, max_lr=3e-3, total_steps=10)
    assert peak_lr(one_cycle) == pytest.approx(3e-3)


def test_recipe_settings_warn_and_name_the_micro_batches_that_fix_them():
    # The recipe's old default (lr 2e-3, m=4, N=2): a quarter of stage 0's micro-batches are stale.
    text = staleness_advice("paci", adamw(2e-3, warmup=True), n_stages=2, micro_batches=4)
    assert text is not None
    assert "micro_batches >= 16" in text and "(N-1)/a = 0.25" in text and "peak lr <= 0.000125" in text
    # m=16 is the measured point that ended within 1% of flush: quiet; so is the lr named at m=4.
    assert staleness_advice("paci", adamw(2e-3), 2, 16) is None
    assert staleness_advice("paci", adamw(STALE_BOUND * 16), 2, 4) is None
    # lr/a alone is not the rule: 1e-3 at m=8 (the lr/a of 2e-3 at m=16) ended worse, and warns.
    assert "micro_batches >= 12" in staleness_advice("paci", adamw(1e-3), 2, 8)
    # accumulate_grad_batches multiplies a: fewer micro-batches are needed.
    assert "micro_batches >= 8" in staleness_advice("paci", adamw(2e-3), 2, 4, 2)
    # More stages: stage 0 forwards N-1 micro-batches of each window before its step.
    four = staleness_advice("paci", adamw(2e-3), n_stages=4, micro_batches=16)
    assert four is not None and "micro_batches >= 48" in four


@pytest.mark.parametrize("schedule,optimizer,n_stages", [
    ("1f1b", adamw(1e-2), 2),  # flush schedules carry no stale forward
    ("gpipe", adamw(1e-2), 2),
    ("paci", torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), 2),  # not measured: no advice
    ("paci", adamw(1e-2), 1),  # one stage: nothing in flight
])
def test_no_warning_where_the_rule_does_not_apply(schedule, optimizer, n_stages):
    assert staleness_advice(schedule, optimizer, n_stages, micro_batches=2) is None


def _setup_optimizers(schedule: str, rank: int = 0) -> list[str]:
    """What PACIStrategy.setup_optimizers warns, in this process (no stage processes started)."""
    import warnings

    import lightning as L
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from lightning_paci import PACIStrategy
    from tests.models import LitTiny

    lit, strategy = LitTiny(), PACIStrategy(schedule=schedule, micro_batches=4)  # AdamW lr 1e-2
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=1, logger=False,
                        enable_progress_bar=False)
    strategy._lightning_module, lit.trainer = lit, trainer
    saved, rank_zero_only.rank = rank_zero_only.rank, rank
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            strategy.setup_optimizers(trainer)
    finally:
        rank_zero_only.rank = saved
    return [str(w.message) for w in caught if "lr x ((N-1)/a)^2" in str(w.message)]


def test_strategy_warns_at_setup_on_rank_zero_only():
    [text] = _setup_optimizers("paci")  # lr 1e-2: a >= sqrt(1e-2 / STALE_BOUND) = 35.8
    assert "micro_batches >= 36" in text and "peak lr 0.01" in text
    assert _setup_optimizers("paci", rank=1) == []  # the other stages stay quiet
    assert _setup_optimizers("1f1b") == []
