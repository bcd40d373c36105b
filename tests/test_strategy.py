"""End-to-end runs of the Lightning strategy: logging, checkpoints, failures and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import lightning_paci  # noqa: F401  (registers the strategy names)
from lightning_paci import PACIStrategy
from tests.models import LitTiny, loader
from tests.reference import batches, train_reference
from tests.test_pipeline_correctness import SCRIPT, STEPS, assert_same, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_fit_by_name_logs_loss_and_telemetry_to_tensorboard(tmp_path):
    result, _ = run_pipeline(tmp_path, "--by-name", "--schedule", "paci", "--dtype", "float32", "--steps", "12",
                             "--val-every", "4", "--logger", "--count-collectives", "--validate", fork=False)
    assert result["global_step"] == 12
    assert result["validated"]["val_loss"] == pytest.approx(result["metrics"]["val_loss"], rel=1e-6)
    for rank in (0, 1):  # steady state: stages talk to neighbours only, nothing waits on all ranks
        calls = json.loads((tmp_path / f"collectives_rank{rank}.json").read_text())
        assert calls.pop("outside batches") > 0  # the counter does see collectives (setup, drains)
        assert calls == {}
    assert "val_loss" in result["metrics"]
    run_dir = next((tmp_path / "tb").rglob("events.out.tfevents*")).parent
    events = EventAccumulator(str(run_dir))  # fit's and validate's event files, merged
    events.Reload()
    tags = events.Tags()["scalars"]
    train = [e.value for e in events.Scalars("train_loss")]
    assert [e.step for e in events.Scalars("train_loss")] == list(range(12))
    assert [e.step for e in events.Scalars("val_loss")] == [3, 7, 11, 12]  # 12: trainer.validate()
    assert sum(train[-4:]) < sum(train[:4])  # it learns
    for stage in (0, 1):
        assert f"pipeline/stage{stage}/utilization" in tags
    assert events.Scalars("pipeline/stage0/max_drift")[-1].value == 1


def _single_device_resume(tmp_path: Path, steps: int, epoch_batches: int) -> dict:
    """Lightning's own single-device run with the same checkpoint/resume (its loop semantics included)."""
    def fit(ckpt_path=None):
        L.seed_everything(0, verbose=False)
        model = LitTiny(dtype=torch.float64, sched=True)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=-1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[L.pytorch.callbacks.ModelCheckpoint(tmp_path, save_top_k=-1,
                                                                           filename="{epoch}-{step}")])
        trainer.fit(model, loader(8, n=8 * epoch_batches), ckpt_path=ckpt_path)
        return model
    fit()
    return fit(tmp_path / f"epoch=0-step={epoch_batches}.ckpt").state_dict()


def test_checkpoint_resume_matches_lightning_single_device_resume(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    common = ["--schedule", "1f1b", "--sched", "--steps", "6", "--epoch-batches", "3"]
    run_pipeline(first, *common, "--ckpt-dir", str(first / "ckpt"))
    ckpt = first / "ckpt" / "epoch=0-step=3.ckpt"
    assert (ckpt / "meta.pt").is_file() and not list((first / "ckpt").glob("*.tmp"))
    _, resumed = run_pipeline(second, *common, "--resume", str(ckpt))
    assert_same(resumed, _single_device_resume(tmp_path / "single", 6, 3))


def test_paci_checkpoint_restores_exact_state(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    run_pipeline(first, "--schedule", "paci", "--steps", "6", "--epoch-batches", "3", "--ckpt-dir",
                 str(first / "ckpt"))
    ckpt = first / "ckpt" / "epoch=0-step=3.ckpt"
    _, restored = run_pipeline(second, "--schedule", "paci", "--steps", "3", "--epoch-batches", "3",
                               "--resume", str(ckpt))
    dcp_to_torch_save(ckpt, tmp_path / "flat.pt")
    saved = torch.load(tmp_path / "flat.pt")
    assert_same(restored, {k[len("model/"):]: v for k, v in saved.items() if k.startswith("model/")}, tol=0)
    assert any(k.startswith("optim/") and k.endswith("/exp_avg") for k in saved)


@pytest.mark.parametrize("unit,stage,fork", [("model.transformer.h.0", 0, False), ("model.lm_head", 1, True)])
def test_failing_stage_takes_the_job_down_naming_it(tmp_path, unit, stage, fork):
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--schedule", "paci", "--steps", "6",
           "--fail-unit", unit, "--fail-step", "2", "--timeout", "60"]
    cmd += ["--start-method", "fork"] if fork else []
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60, "the job should end on the failure, not on the timeout"
    out = proc.stdout + proc.stderr
    assert f"stage {stage} failed at F8 (micro-batch 8" in out and f"injected failure in {unit}" in out
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a stage process was left running"


def test_shuffled_loader_gives_every_stage_the_same_batches(tmp_path):
    """shuffle=True with dropout: the processes' RNGs diverge, the batch order must not (DistributedSampler)."""
    run_pipeline(tmp_path, "--shuffle", "--dropout", "0.1", "--steps", "12", "--epoch-batches", "4",
                 "--record-batches", fork=False)
    ranks = [json.loads((tmp_path / f"batches_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == 12 and ranks[0] == ranks[1]
    assert ranks[0][:4] != ranks[0][4:8]  # it does shuffle, differently each epoch


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_same_script_under_torchrun(tmp_path):
    """torchrun creates the processes; Lightning's cluster environment picks them up, nothing is re-launched."""
    cmd = ["torchrun", "--nproc-per-node", "2", "--master-port", "29561", str(SCRIPT), "--out", str(tmp_path),
           "--schedule", "1f1b", "--steps", str(STEPS)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    merged = {k: v for f in tmp_path.glob("stage*.pt") for k, v in torch.load(f).items()}
    assert_same(merged, train_reference(4, batches(8, STEPS)))


def test_optimizer_aliases_share_storage_and_skip_other_stages():
    """No parameter copy: the optimizer's tensors are views of the stage's own parameters."""
    from lightning_paci.runtime import alias_parameters

    owned, hollow = nn.Linear(3, 3), nn.Linear(3, 3).to("meta")
    opt = torch.optim.AdamW([{"params": owned.parameters()}, {"params": hollow.parameters()}])
    pairs = alias_parameters(opt)
    assert [p for p, _ in pairs] == list(owned.parameters())
    assert all(a.data_ptr() == p.data_ptr() and a is not p for p, a in pairs)
    assert opt.param_groups[1]["params"] == []


# -- bad input: raised in the main process, before any stage process starts ---------------------------
def _fit(model, devices=2, **strategy_kwargs):
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=PACIStrategy(**strategy_kwargs),
                        max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(model, loader())


class Manual(LitTiny):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class Flat(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder, self.head = nn.Linear(8, 8), nn.Linear(8, 2)


class TwiceTied(LitTiny):
    def __init__(self):
        super().__init__()
        self.model.lm_head.weight = self.model.transformer.wte.weight
        self.model.transformer.h[3].mlp[0].weight = self.model.transformer.h[0].mlp[0].weight


@pytest.mark.parametrize("make,kwargs,devices,message", [
    (Manual, {}, 2, "automatic_optimization=True"),
    (Flat, {}, 2, "no nn.ModuleList or nn.Sequential of blocks"),
    (TwiceTied, {}, 2, "2 groups of weights tied across stages"),  # PACI keeps one group (tied.py)
    (lambda: LitTiny(n_layers=2), {}, 4, "at most 3 stages"),
    (LitTiny, {"stages": 3}, 2, "give it a multiple of 3"),
    (LitTiny, {"split_points": ["model.nope"]}, 2, "are not modules of the model"),
    (lambda: LitTiny(n_layers=8), {"max_drift": 1, "micro_batches": 2, "stages": 4}, 4, "micro_batches>=3"),
])
def test_bad_input_fails_before_processes_start(make, kwargs, devices, message):
    with pytest.raises(ValueError, match=message):
        _fit(make(), devices=devices, **kwargs)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("kwargs,message", [
    ({"micro_batches": 0}, "micro_batches must be an integer >= 1"),
    ({"schedule": "zb"}, "unknown schedule"),
    ({"partition": "flops"}, "partition='flops' is not supported"),
])
def test_bad_constructor_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PACIStrategy(**kwargs)


def test_gradient_norm_clipping_is_refused_before_launch():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="paci", gradient_clip_val=1.0, max_steps=1,
                        logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="gradient_clip_algorithm='value'"):
        trainer.fit(LitTiny(), loader())


@pytest.mark.parametrize("args,message", [
    (["--batch-size", "6"], "batch size 6 is not divisible by micro_batches=4"),
    (["--two-optimizers"], "configure_optimizers returned several optimizers"),
])
def test_bad_input_inside_processes_fails_on_every_stage(tmp_path, args, message):
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--start-method", "fork", "--steps", "2", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr
