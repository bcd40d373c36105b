"""Pretrain a GPT with a pipeline schedule; Hydra composes the run from conf/.

    python recipes/pretrain_gpt.py                                # PACI, 2 stages, CPU, embedded corpus
    python recipes/pretrain_gpt.py -m strategy=paci,pipe_1f1b,pipe_gpipe strategy.micro_batches=4,8
    python recipes/pretrain_gpt.py strategy=single                # one process, no pipeline
    python recipes/pretrain_gpt.py data=text_file data.path=notes.txt
    tensorboard --logdir runs/
    python recipes/compare.py runs/<sweep>

A run writes its TensorBoard events, its composed config (.hydra/) and its log to
runs/<sweep>/<name>: <sweep> is the launch time (the runs of one -m sweep share it), <name> says
the schedule and the micro-batch count (paci-m8). At the end it prints the final validation
perplexity next to the unigram perplexity of the validation split, the level of a model that
ignores context.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `recipes` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
import lightning as L
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import MISSING, DictConfig, OmegaConf

from recipes.callbacks import PipelineThroughput, ValidationClock


@dataclass
class RunConfig:
    root: str = "runs"
    sweep: str = MISSING
    name: str = MISSING


@dataclass
class RecipeConfig:
    """Schema of conf/config.yaml: an unknown top-level key fails at composition. The groups are
    checked by the typed constructors they are passed to (model, data, strategy, Trainer)."""

    seed: int = MISSING
    throughput_window: int = MISSING
    run: RunConfig = field(default_factory=RunConfig)
    model: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    strategy: Any = MISSING


ConfigStore.instance().store(name="recipe_schema", node=RecipeConfig)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def build(cfg: DictConfig, run_dir: Path):
    """The objects of one run: (trainer, model, datamodule)."""
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, vocab_size=datamodule.vocab_size)
    # A strategy group either names a strategy class (_target_) or is a plain Lightning name ("auto").
    strategy = instantiate(cfg.strategy) if OmegaConf.is_dict(cfg.strategy) else cfg.strategy
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    callbacks = [PipelineThroughput(window_size=cfg.throughput_window), ValidationClock()]
    trainer = L.Trainer(**cfg.trainer, strategy=strategy, logger=logger, callbacks=callbacks)
    return trainer, model, datamodule


def report(trainer: L.Trainer, datamodule, run_dir: Path) -> float:
    """Print the final validation perplexity beside the unigram one; save pipeline telemetry."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    ppl, unigram = metrics.get("val/ppl", float("nan")), datamodule.val_unigram_perplexity()
    tokens, elapsed = metrics.get("val/tokens_seen", 0.0), metrics.get("val/elapsed_s", 0.0)
    print(
        f"\nfinal validation perplexity {ppl:.3f}  |  unigram (byte-frequency) perplexity of the "
        f"validation split {unigram:.3f}  |  ratio {ppl / unigram:.3f}\n"
        f"at the last validation: {tokens:.0f} tokens, {elapsed:.1f} s of training, "
        f"{tokens / elapsed if elapsed else 0:.0f} tokens/s  ->  {run_dir}"
    )
    telemetry = getattr(trainer.strategy, "telemetry", None)
    if telemetry:
        (run_dir / "telemetry.json").write_text(json.dumps(telemetry, indent=2, default=str) + "\n")
        keys = ("max_drift", "utilization", "bubble_fraction", "peak_in_flight", "optimizer_steps")
        for stage, row in enumerate(telemetry):
            print(f"stage {stage}: " + "  ".join(f"{k}={row[k]:.3g}" for k in keys if k in row))
    return ppl


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if os.environ.get("LOCAL_RANK", "0") == "0" and any(run_dir.glob("events.out.tfevents.*")):
        raise FileExistsError(
            f"{run_dir} already holds a run's events; runs of one sweep need distinct names: "
            "set run.name, e.g. run.name='${strategy.schedule}-m${strategy.micro_batches}-L${model.n_layer}'"
        )
    trainer, model, datamodule = build(cfg, run_dir)
    # Build the token cache here, once, before the strategy starts one process per stage.
    datamodule.prepare_data()
    trainer.fit(model, datamodule=datamodule)
    return report(trainer, datamodule, run_dir) if trainer.is_global_zero else float("nan")


if __name__ == "__main__":
    main()
