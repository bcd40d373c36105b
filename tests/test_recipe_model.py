"""The recipe's GPT: the reference model's shape, optimizer and schedule; splittable into stages."""

from __future__ import annotations

import math

import pytest
import torch

from recipes.gpt import GPT, lr_factor

pytestmark = pytest.mark.timeout(60)


def tiny(**kw) -> GPT:
    return GPT(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, max_steps=100, **kw)


def test_forward_shapes_and_causality():
    model = tiny().eval()
    x = torch.randint(0, 256, (3, 16))
    logits = model(x)
    assert logits.shape == (3, 16, 256)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 256  # change the future: earlier logits must not move
    torch.testing.assert_close(model(y)[:, :10], logits[:, :10])
    with pytest.raises(ValueError, match="longer than block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_splittable_shape_children_in_execution_order_untied_head():
    model = tiny()
    assert [n for n, _ in model.named_children()] == ["embed", "blocks", "ln_f", "lm_head", "val_nll"]
    assert not list(model.named_parameters(recurse=False))
    assert model.lm_head.weight.data_ptr() != model.embed.wte.weight.data_ptr()


def test_lightning_paci_partitions_the_model():
    partition = pytest.importorskip("lightning_paci.partition")
    split = partition.partition_model(GPT(vocab_size=256), 2)
    assert split.trunk == "blocks"
    assert split.units == ("embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "ln_f", "lm_head")
    assert split.stage_of[0] == 0 and split.stage_of[-1] == 1


def test_adamw_betas_and_weight_decay_on_matrices_only():
    model = tiny()
    config = model.configure_optimizers()
    opt = config["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    assert config["lr_scheduler"]["interval"] == "step"


def test_warmup_then_cosine_to_ten_percent():
    f = [lr_factor(s, warmup_steps=10, max_steps=110, min_ratio=0.1) for s in range(121)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)  # half-way down the cosine
    assert f[110] == pytest.approx(0.1) and f[120] == pytest.approx(0.1)  # floor at 10% of the peak
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    sched = tiny(warmup_fraction=0.1).configure_optimizers()["lr_scheduler"]["scheduler"]
    assert sched.get_last_lr()[0] == pytest.approx(2e-3 * 0.1)


def test_validation_perplexity_is_exp_of_the_token_mean_loss():
    model = tiny()
    batches = [(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))) for _ in range(3)]
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    with torch.no_grad():
        losses = [model._loss(model(x), y) for x, y in batches]
        for k, b in enumerate(batches):
            model.validation_step(b, k)
    model.on_validation_epoch_end()
    mean = float(torch.stack(losses).mean())
    assert logged["val/loss"] == pytest.approx(mean, rel=1e-5)
    assert logged["val/ppl"] == pytest.approx(math.exp(mean), rel=1e-5)
    assert 200 < logged["val/ppl"] < 320  # an untrained byte model is close to uniform over 256
