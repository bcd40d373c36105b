"""What a LightningModule logs and returns, end to end through ``Trainer``: torchmetrics Metrics,
``self.log`` reductions, validation_step return values, ModelCheckpoint/EarlyStopping monitors.

The flush schedules must log exactly what Lightning's own single-device run of the same module logs
(their weights match it); PACI's weights differ, so its run is checked for what holds within a batch
(a Metric's step value is the batch's accuracy, sums add up, outputs come back in order).

    python tests/test_metrics_logging.py --schedule 1f1b --out /tmp/run   # the pipeline run the tests launch
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, Timer  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torchmetrics.classification import MulticlassAccuracy  # noqa: E402

from lightning_paci import PACIStrategy  # noqa: E402
from tests.models import LitTiny, loader  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS, EPOCH_BATCHES, BATCH, M, TOKENS = 6, 3, 8, 4, 8 * 8  # TOKENS: targets per batch (8 sequences x 8)


class LitMetrics(LitTiny):
    """Logs the ways torchmetrics' and Lightning's docs teach, written for one device."""

    def __init__(self) -> None:
        super().__init__(dtype=torch.float64)
        self.train_acc, self.train_acc_u, self.train_acc_hook, self.val_acc, self.val_acc_f = (
            MulticlassAccuracy(32, average="micro") for _ in range(5))

    def _outputs(self, batch):
        x, y = batch
        logits = self.model(x)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        preds = logits.argmax(-1)
        return losses, preds, y, (preds == y).double()

    def training_step(self, batch, batch_idx):
        losses, preds, y, correct = self._outputs(batch)
        self.train_acc(preds, y)  # forward: the batch's accuracy, accumulated into the epoch's
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=True)
        self.train_acc_u.update(preds, y)
        self.train_acc_hook.update(preds, y)
        self.log("train_acc_u", self.train_acc_u, on_step=False, on_epoch=True)
        self.log("train_acc_t", correct.mean(), on_step=True, on_epoch=True)
        self.log("n_correct", correct.sum(), reduce_fx="sum", on_step=True, on_epoch=True)
        self.log("loss_max", losses.max(), reduce_fx=torch.max, on_step=True, on_epoch=True)
        self.log("loss_min", losses.min(), reduce_fx="min", on_step=True, on_epoch=True)
        self.log("train_loss", losses.mean())
        return losses.mean()

    def on_train_epoch_end(self):
        self.log("train_acc_hook", self.train_acc_hook)  # every stage runs this hook

    def validation_step(self, batch, batch_idx):
        losses, preds, y, correct = self._outputs(batch)
        self.val_acc.update(preds, y)
        self.log("val_acc", self.val_acc)
        self.val_acc_f(preds, y)
        self.log("val_acc_f", self.val_acc_f, on_step=True, on_epoch=True)
        self.log("val_acc_t", correct.mean(), on_step=True, on_epoch=True)
        self.log("val_n_correct", correct.sum(), reduce_fx="sum")
        self.log("val_gathered", self.all_gather(correct.mean()).sum())
        return {"loss": losses.mean(), "preds": preds, "y": y, "tag": "val"}


class Record(L.Callback):
    """Writes, on global rank 0, validation_step's outputs and what the monitoring callbacks did."""

    def __init__(self, out: Path) -> None:
        self.out, self.outputs = out, []

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.global_rank == 0:
            self.outputs.append({k: v.tolist() if torch.is_tensor(v) else v for k, v in outputs.items()})

    def on_fit_end(self, trainer, module) -> None:
        if trainer.global_rank == 0:
            ckpt = trainer.checkpoint_callback
            result = {"outputs": self.outputs, "best": Path(ckpt.best_model_path).name,
                      "best_score": float(ckpt.best_model_score),
                      "saved": sorted(p.name for p in Path(ckpt.dirpath).iterdir()),
                      "early_stopping_best": float(trainer.early_stopping_callback.best_score)}
            (self.out / "record.json").write_text(json.dumps(result))


def fit(out: Path, strategy: PACIStrategy | None) -> None:
    L.seed_everything(0, verbose=False)
    model = LitMetrics()
    callbacks = [Record(out),
                 ModelCheckpoint(out / "ckpt", monitor="train_loss", every_n_train_steps=2, save_top_k=1,
                                 filename="{step}"),
                 EarlyStopping(monitor="train_acc_t_epoch", mode="max", patience=100,
                               check_on_train_epoch_end=True),
                 # stops if any stage sees 0 (an empty Metric's value): the data's accuracy is above it
                 EarlyStopping(monitor="train_acc_hook", mode="min", stopping_threshold=1e-6,
                               check_on_train_epoch_end=True)]
    trainer = L.Trainer(accelerator="cpu", devices=2 if strategy else 1, strategy=strategy or "auto",
                        max_steps=STEPS, max_epochs=-1, callbacks=callbacks, logger=CSVLogger(out, name="csv"),
                        log_every_n_steps=1, use_distributed_sampler=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=2)
    trainer.fit(model, loader(BATCH, n=BATCH * EPOCH_BATCHES), loader(BATCH, n=2 * BATCH, seed=1))


def logged(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged value, per key, in order: (step, value); the pipeline's own telemetry left out."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(next(out.rglob("metrics.csv"))) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value != "" and not key.startswith("pipeline/"):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def _values(series, key):
    return [v for _, v in series[key]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    fit(out, None)
    return out


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "paci"])
def test_metrics_logs_and_outputs_match_single_device(tmp_path, reference, schedule):
    cmd = [sys.executable, __file__, "--schedule", schedule, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got, record = logged(tmp_path), json.loads((tmp_path / "record.json").read_text())
    # Within every batch, whatever the weights: a Metric's step value is the batch's, not a micro-batch's.
    approx = lambda values: pytest.approx(values, rel=1e-6)  # noqa: E731  (torchmetrics computes in float32)
    assert _values(got, "train_acc_step") == approx(_values(got, "train_acc_t_step"))
    assert len(got["train_acc_step"]) == STEPS
    assert _values(got, "n_correct_step") == approx([v * TOKENS for v in _values(got, "train_acc_t_step")])
    for key in ("train_acc_epoch", "train_acc_u", "train_acc_hook"):
        assert _values(got, key) == approx(_values(got, "train_acc_t_epoch"))
    for key in ("val_acc", "val_acc_f_epoch", "val_gathered"):
        assert _values(got, key) == approx(_values(got, "val_acc_t_epoch"))
    assert _values(got, "val_acc_f_step") == approx(_values(got, "val_acc_t_step"))
    assert all(hi >= lo for hi, lo in zip(_values(got, "loss_max_step"), _values(got, "loss_min_step")))
    # validation_step's return value is the batch's: per-sample tensors concatenated in order.
    val_y = [y.tolist() for _, y in loader(BATCH, n=2 * BATCH, seed=1)]
    assert [o["y"] for o in record["outputs"]] == val_y * (STEPS // EPOCH_BATCHES)
    assert all(len(o["preds"]) == BATCH and o["tag"] == "val" for o in record["outputs"])
    assert record["best"].startswith("step=") and record["saved"] == [record["best"]]
    if schedule == "paci":
        return
    # Flush schedules hold single-device weights: everything logged and returned is Lightning's own.
    expected, expected_record = logged(reference), json.loads((reference / "record.json").read_text())
    assert set(got) == set(expected)
    for key in expected:
        assert [s for s, _ in got[key]] == [s for s, _ in expected[key]], key
        assert _values(got, key) == pytest.approx(_values(expected, key), rel=1e-9), key
    for got_out, want in zip(record["outputs"], expected_record["outputs"]):
        assert got_out["preds"] == want["preds"] and got_out["loss"] == pytest.approx(want["loss"], rel=1e-9)
    assert {k: record[k] for k in ("best", "saved")} == {k: expected_record[k] for k in ("best", "saved")}
    assert record["best_score"] == pytest.approx(expected_record["best_score"], rel=1e-9)
    assert record["early_stopping_best"] == pytest.approx(expected_record["early_stopping_best"], rel=1e-9)



@pytest.mark.parametrize("trainer_kwargs,callback,message", [
    ({"max_time": {"minutes": 5}}, None, r"Trainer\(max_time=...\)"),
    ({}, Timer(timedelta(minutes=5), interval="step"), r"interval='epoch'"),
    ({}, ModelCheckpoint(train_time_interval=timedelta(minutes=5)), "use every_n_train_steps"),
])
def test_per_batch_clock_broadcasts_are_refused_before_launch(trainer_kwargs, callback, message):
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=PACIStrategy(), max_steps=1, logger=False,
                        enable_progress_bar=False, callbacks=[callback] if callback else None, **trainer_kwargs)
    with pytest.raises(ValueError, match=message):
        trainer.fit(LitTiny(), loader())
    assert not torch.distributed.is_initialized()


def test_collectives_once_per_epoch_are_accepted():
    from lightning_paci.checks import check_callbacks

    check_callbacks(L.Trainer(accelerator="cpu", devices=2, strategy=PACIStrategy(), logger=False,
                              callbacks=[Timer(timedelta(minutes=5), interval="epoch"),
                                         EarlyStopping("x", check_on_train_epoch_end=True)]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedule", required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fit(args.out, PACIStrategy(schedule=args.schedule, micro_batches=M, timeout_s=30, start_method="fork"))
