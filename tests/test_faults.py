"""Faults and bad input: meta tensors reaching real compute, misconfigurations (issue 12).
"""

from __future__ import annotations

import copy
import re

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_paci import PACIStrategy
from lightning_paci.checks import check_last_batch, warn_if_schedule_changed
from lightning_paci.hollow import PartitionError, StageView
from lightning_paci.partition import partition_model
from tests.models import LitTiny, TinyGPT, token_data


# -- 5. meta tensors never reach real compute -----------------------------------------------------------
class _TiedInForward(TinyGPT):
    """Weight tying written in the forward: the head reuses the stage-0 embedding's weight."""

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.size(1)))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x) @ self.transformer.wte.weight.T


class _PositionsReusedLate(TinyGPT):
    """A tensor computed by a stage-0 module (the position embedding) used again after stage 1 began."""

    def forward(self, idx):
        pos = self.transformer.wpe(torch.arange(idx.size(1)))
        x = self.transformer.wte(idx) + pos
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x + pos))


@pytest.mark.parametrize("make,origin", [
    (_TiedInForward, "parameter transformer.wte.weight (stage 0)"),
    (_PositionsReusedLate, "the output of transformer.wpe (stage 0)"),
])
@pytest.mark.parametrize("grad", [True, False])
def test_a_meta_tensor_reaching_real_compute_raises_naming_its_origin(make, origin, grad):
    """On fedc153 the tied head computed garbage from the meta weight (validate: val_loss=inf, no error)."""
    torch.manual_seed(0)
    model = make(n_layers=2)
    part = partition_model(model, 2, ["transformer.h.1"])
    units = dict(zip(part.units, part.stage_of))
    idx = torch.randint(0, 32, (2, 8))
    stages = [copy.deepcopy(model) for _ in range(2)]
    views = [StageView(m, units, s, 2) for s, m in enumerate(stages)]
    with torch.set_grad_enabled(grad):
        _, sent = views[0].run(lambda: stages[0](idx), [])
        received = [t.detach().requires_grad_(grad) for t in sent]
        with pytest.raises(PartitionError, match=re.escape(origin) + ".*reached real compute"):
            views[1].run(lambda: stages[1](idx), received)


def test_marked_hollow_tensors_stay_usable_for_bookkeeping():
    """What the strategy does with other stages' parameters (is_meta, numel, state_dict, .T) still works."""
    model = TinyGPT(n_layers=2)
    part = partition_model(model, 2, ["transformer.h.1"])
    StageView(model, dict(zip(part.units, part.stage_of)), 1, 2)
    weight = model.transformer.wte.weight
    assert weight.is_meta and weight.numel() == 32 * 16 and weight.T.shape == (16, 32)
    hollow = {k for k, v in model.state_dict().items() if v.is_meta}
    assert "transformer.wte.weight" in hollow and "lm_head.weight" not in hollow


# -- 7. smaller misconfigurations -----------------------------------------------------------------------
class _Plateau(LitTiny):
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        config = {"scheduler": sched, "interval": "step", "monitor": "train_loss"}
        return {"optimizer": opt, "lr_scheduler": config}


class _EpochScheduler(LitTiny):
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}


@pytest.mark.parametrize("make,message,not_said", [
    (_Plateau, "ReduceLROnPlateau steps on a monitored metric, which only the last pipeline stage",
     "got interval='step'"),
    (_EpochScheduler, "StepLR has interval='epoch'", None),
])
def test_lr_scheduler_refusals_say_what_is_wrong(make, message, not_said):
    """On fedc153 the plateau refusal read "must use interval='step' ... got interval='step'"."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=PACIStrategy(), logger=False)
    model = make()
    model.trainer = trainer
    trainer.strategy._lightning_module = model
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        trainer.strategy.setup_optimizers(trainer)
    assert not_said is None or not_said not in str(error.value)


def test_a_short_last_batch_micro_batches_cannot_split_fails_before_launch():
    """On fedc153 it failed at the end of the first epoch, after training it."""
    x, y = token_data(66)
    data = DataLoader(TensorDataset(x, y), batch_size=8, drop_last=False)  # last batch: 2 samples
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=PACIStrategy(micro_batches=4), max_epochs=1,
                        logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"last batch of every epoch has 2 samples .* drop_last=True"):
        trainer.fit(LitTiny(), data)
    assert not torch.distributed.is_initialized()
    check_last_batch(DataLoader(TensorDataset(x[:64], y[:64]), batch_size=8), 4)  # 8 full batches: fine
    check_last_batch(data, 4, max_steps=8)  # the short batch is never reached


def test_resuming_under_another_schedule_warns():
    saved = {"n_stages": 2, "schedule": "paci", "units": []}
    with pytest.warns(UserWarning, match="saved by a 'paci' run .* schedule='1f1b'"):
        warn_if_schedule_changed("last.ckpt", saved, {**saved, "schedule": "1f1b"})
