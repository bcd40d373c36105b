"""Partitioning into units and stages, and hollow stages, in one process (no torch.distributed)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_paci.hollow import PartitionError, StageView
from lightning_paci.partition import list_units, partition_model
from tests.models import TinyGPT


class SequentialNet(nn.Module):
    """A plain nn.Sequential model, called as self(x)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), *[nn.Linear(16, 16) for _ in range(4)],
                                 nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_units_of_a_nanogpt_follow_registration_order():
    units = [n for n, _ in list_units(TinyGPT(n_layers=3), "transformer.h")]
    assert units == ["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0",
                     "transformer.h.1", "transformer.h.2", "transformer.ln_f", "lm_head"]


def test_balanced_uniform_and_explicit_partitions():
    model = TinyGPT(n_layers=4)
    by_params = partition_model(model, 2)
    assert by_params.stage_units(1)[0] == "transformer.h.2"
    assert sum(by_params.stage_params(i) for i in range(2)) == sum(p.numel() for p in model.parameters())
    uniform = partition_model(model, 4, partition="uniform")
    assert [uniform.first_unit(i) for i in (1, 2, 3)] == ["transformer.h.1", "transformer.h.2", "transformer.h.3"]
    explicit = partition_model(model, 3, split_points=["transformer.h.1", "lm_head"])
    assert explicit.stage_units(2) == ["lm_head"]
    assert "stage" in explicit.table() and "lm_head" in explicit.table()


def test_plain_sequential_splits_into_its_children():
    part = partition_model(SequentialNet(), 3)
    assert part.trunk == "net" and part.n_stages == 3
    assert all(u.startswith("net.") for u in part.units)


@pytest.mark.parametrize("bad,message", [
    ({"split_points": ["transformer.h.2", "transformer.h.1"]}, "in execution order"),
    ({"split_points": ["transformer.h.9"]}, "not modules of the model"),
])
def test_bad_split_points(bad, message):
    with pytest.raises(ValueError, match=message):
        partition_model(TinyGPT(n_layers=4), 2 if len(bad["split_points"]) == 1 else 3, **bad)


def test_parameters_directly_on_a_split_container_are_refused():
    model = TinyGPT()
    model.scale = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="directly on the root module"):
        partition_model(model, 2)


def _stages(model: nn.Module, n: int, split_points=None) -> list[tuple[nn.Module, StageView]]:
    part = partition_model(model, n, split_points)
    units = dict(zip(part.units, part.stage_of))
    out = []
    for stage in range(n):
        replica = copy.deepcopy(model)
        out.append((replica, StageView(replica, units, stage, n)))
    return out


@pytest.mark.parametrize("make,inputs,n", [
    (lambda: TinyGPT(n_layers=4), lambda: torch.randint(0, 32, (3, 8)), 3),
    (SequentialNet, lambda: torch.randn(5, 6), 3),
])
def test_hollow_stages_chained_by_hand_reproduce_the_model(make, inputs, n):
    torch.manual_seed(0)
    model, x = make(), inputs()
    expected = model(x)
    stages = _stages(model, n)
    received: list[torch.Tensor] = []
    for i, (replica, view) in enumerate(stages):
        result, out = view.run(lambda: replica(x), [t.detach().requires_grad_() for t in received])
        if i < n - 1:
            assert result is None and all(not t.is_meta for t in out)
            received = out
    torch.testing.assert_close(result, expected)
    owned = [sum(p.numel() for p in r.parameters() if not p.is_meta) for r, _ in stages]
    assert sum(owned) == sum(p.numel() for p in model.parameters()) and min(owned) > 0


def test_a_module_reused_across_stages_is_caught():
    class Reuse(TinyGPT):
        def forward(self, idx):
            x = super().forward(idx)
            return x + self.transformer.wte(idx)[..., :1]  # the stage-0 embedding used again at the end

    model = Reuse(n_layers=2)
    stages = _stages(model, 2)
    idx = torch.randint(0, 32, (2, 8))
    _, out = stages[0][1].run(lambda: stages[0][0](idx), [])
    with pytest.raises(PartitionError, match="transformer.wte belongs to stage 0"):
        stages[1][1].run(lambda: stages[1][0](idx), out)


def test_out_of_order_forward_is_caught():
    class Backwards(TinyGPT):
        def forward(self, idx):
            x = self.transformer.wte(idx)
            for block in reversed(self.transformer.h):
                x = block(x)
            return self.lm_head(self.transformer.ln_f(x))

    model = Backwards(n_layers=4)
    stages = _stages(model, 2)
    with pytest.raises(PartitionError, match="out of registration order"):
        stages[0][1].run(lambda: stages[0][0](torch.randint(0, 32, (2, 8))), [])
