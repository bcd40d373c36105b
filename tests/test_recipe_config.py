"""Every config of conf/ composes in struct mode and builds its objects; a misspelt key fails."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from recipes.data import TokenDataModule
from recipes.gpt import GPT
from recipes.pretrain_gpt import CONF_DIR, build

try:
    from lightning_paci import PACIStrategy
except ImportError:  # the strategy is not there yet: its configs are skipped
    PACIStrategy = None

needs_strategy = pytest.mark.skipif(PACIStrategy is None, reason="lightning_paci.PACIStrategy not importable")
GROUPS = {g: sorted(p.stem for p in (Path(CONF_DIR) / g).glob("*.yaml")) for g in ("model", "data", "trainer",
                                                                                   "strategy")}
pytestmark = pytest.mark.timeout(120)


def compose_config(overrides: list[str], conf_dir: str = CONF_DIR):
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_groups_hold_the_documented_options():
    assert GROUPS == {
        "model": ["cpu", "gpt2_medium", "gpt2_small"],
        "data": ["openwebtext", "stdlib", "text_file"],
        "trainer": ["cpu", "gpu"],
        "strategy": ["paci", "pipe_1f1b", "pipe_gpipe", "single"],
    }


def test_every_key_is_commented():
    for path in Path(CONF_DIR).rglob("*.yaml"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            content = line.split("#")[0].strip()
            # keys with a value carry a comment on their line or on a comment line just above
            if content.endswith(":") or not content or content.startswith("-") or ":" not in content:
                continue
            above = path.read_text().splitlines()[n - 2].strip() if n > 1 else ""
            assert "#" in line or above.startswith("#"), f"{path.name}:{n} has no comment: {line!r}"


@pytest.mark.parametrize("model", GROUPS["model"])
def test_models_instantiate(model):
    cfg = compose_config([f"model={model}"])
    assert OmegaConf.is_struct(cfg)
    with torch.device("meta"):  # GPT-2 Medium in a blink: shapes only
        gpt = instantiate(cfg.model, vocab_size=50257)
    assert isinstance(gpt, GPT) and gpt.hparams.max_steps == cfg.trainer.max_steps
    assert gpt.lm_head.weight is not gpt.embed.wte.weight  # untied, as in the paper
    if model == "cpu":  # the CPU default, with the byte-level vocabulary of its corpus
        assert 0.8e6 < instantiate(cfg.model, vocab_size=256).num_parameters() < 1e6
    else:  # GPT-2 shapes with the untied head of the paper's reference model
        expected = {"gpt2_small": 163.0e6, "gpt2_medium": 406.3e6}[model]
        assert abs(gpt.num_parameters() - expected) / expected < 0.01


@pytest.mark.parametrize("data", GROUPS["data"])
def test_data_modules_instantiate(data, tmp_path):
    extra = [f"data.path={__file__}"] if data == "text_file" else []
    cfg = compose_config([f"data={data}", f"data.cache_dir={tmp_path}", *extra])
    dm = instantiate(cfg.data)
    assert isinstance(dm, TokenDataModule)
    assert dm.block_size == cfg.model.block_size and dm.seed == cfg.seed


@pytest.mark.parametrize("trainer", GROUPS["trainer"])
def test_trainer_configs_are_trainer_arguments(trainer, tmp_path):
    cfg = compose_config([f"trainer={trainer}", "strategy=single"])
    params = inspect.signature(L.Trainer.__init__).parameters
    assert set(cfg.trainer) <= set(params), set(cfg.trainer) - set(params)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU here: the gpu trainer's keys are checked, not built")
    L.Trainer(**cfg.trainer, default_root_dir=tmp_path, logger=False)


@needs_strategy
@pytest.mark.parametrize("strategy", ["paci", "pipe_1f1b", "pipe_gpipe"])
def test_pipeline_strategies_instantiate(strategy, tmp_path):
    cfg = compose_config([f"strategy={strategy}", "strategy.micro_batches=8"])
    trainer, model, dm = build(cfg, tmp_path)
    assert isinstance(trainer.strategy, PACIStrategy)
    assert trainer.strategy.schedule == {"paci": "paci", "pipe_1f1b": "1f1b", "pipe_gpipe": "gpipe"}[strategy]
    assert trainer.strategy.micro_batches == 8 and trainer.num_devices == 2
    assert cfg.hydra.sweep.subdir == f"{trainer.strategy.schedule}-m8"  # the run's folder says its settings
    assert dm.batch_size % trainer.strategy.micro_batches == 0


def test_single_process_strategy_builds(tmp_path):
    cfg = compose_config(["strategy=single"])
    trainer, model, dm = build(cfg, tmp_path)
    assert trainer.num_devices == 1 and cfg.hydra.run.dir.endswith("/single")
    assert model.hparams.vocab_size == dm.vocab_size == 256


@pytest.mark.parametrize("override", ["trainer.max_step=3", "model.n_layr=2", "data.batchsize=4",
                                      "strategy.micro_batch=8", "seeed=1", "run.nam=x"])
def test_misspelt_override_is_rejected(override):
    with pytest.raises(ConfigCompositionException, match="not in struct|Could not override"):
        compose_config([override])


@pytest.mark.parametrize("file,line,fails_at", [
    ("config.yaml", "sed: 1", "compose"),
    ("model/cpu.yaml", "n_layr: 2", "build"),
    ("data/stdlib.yaml", "batchsize: 4", "build"),
    ("trainer/cpu.yaml", "max_step: 3", "build"),
    ("strategy/paci.yaml", "micro_batch: 8", "build"),
])
def test_misspelt_key_in_a_config_file_is_rejected(tmp_path, file, line, fails_at):
    if file.startswith("strategy/") and PACIStrategy is None:
        pytest.skip("lightning_paci.PACIStrategy not importable")
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    with open(conf / file, "a") as f:
        f.write(f"\n{line}\n")
    if fails_at == "compose":
        with pytest.raises(ConfigCompositionException):
            compose_config([], str(conf))
        return
    cfg = compose_config([f"data.cache_dir={tmp_path}"], str(conf))
    with pytest.raises((TypeError, InstantiationException), match=line.split(":")[0]):
        build(cfg, tmp_path)
