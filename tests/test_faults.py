"""Faults and bad input: meta tensors reaching real compute, misconfigurations (issue 12).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from lightning_paci.hollow import PartitionError, StageView
from lightning_paci.partition import partition_model
from tests.models import TinyGPT


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
