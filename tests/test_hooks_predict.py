"""Lightning's backward/step hooks and trainer.predict under the pipeline, end to end through Trainer.

Each stage must call on_before_backward/on_after_backward once per micro-batch backward (B) and
on_before_optimizer_step/configure_gradient_clipping once per optimizer step (S), on its own
parameters, as Lightning calls them on one device with ``accumulate_grad_batches=micro_batches``
and a batch of one micro-batch (the reference below). ``trainer.predict`` returns every batch's
predictions in the main process. Two pipeline runs (1F1B with popen, PACI with spawn) serve all tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.hooks_script import CallbackHooks, HookedTiny
from tests.models import loader
from tests.test_pipeline_correctness import assert_same

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "hooks_script.py"
STEPS, M, CLIP = 3, 4, 0.05


def _run(out: Path, *args: str) -> list[dict]:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--steps", str(STEPS), "--micro-batches", str(M), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [json.loads((out / f"calls_rank{r}.json").read_text()) for r in (0, 1)]
    return sorted(runs, key=lambda r: r["stage"])


def _single_process(tmp_path: Path, clip: float) -> tuple[HookedTiny, L.Trainer]:
    """Lightning on one device: batches of one micro-batch, accumulate_grad_batches=M."""
    L.seed_everything(0, verbose=False)
    model = HookedTiny(dtype=torch.float64)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, max_epochs=-1, logger=False,
                        accumulate_grad_batches=M, gradient_clip_val=clip or None, gradient_clip_algorithm="value",
                        callbacks=[CallbackHooks()], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, loader(8 // M, n=8 * STEPS))
    return model, trainer


def _restrict(call: list, keys: set[str]) -> list:
    """A single-process hook call, limited to one stage's parameters."""
    if len(call) == 2 and isinstance(call[1], dict):
        return [call[0], {k: v for k, v in call[1].items() if k in keys}]
    return call


def _assert_close(actual, expected, rel: float = 1e-9) -> None:
    """Nested lists/dicts of hook records: equal structure and strings, floats to ``rel``."""
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=rel)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            _assert_close(actual[key], expected[key], rel)
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_close(a, e, rel)
    else:
        assert actual == expected


def _scalars(out: Path) -> EventAccumulator:
    events = EventAccumulator(str(next((out / "tb").rglob("events.out.tfevents*")).parent))
    events.Reload()
    return events


@pytest.fixture(scope="module")
def flush_run(tmp_path_factory):
    """1F1B, popen launcher, clipping by value; fit, then predict with a BasePredictionWriter."""
    out = tmp_path_factory.mktemp("flush")
    stages = _run(out, "--schedule", "1f1b", "--clip", str(CLIP), "--predict", "--writer")
    single, trainer = _single_process(out / "single", CLIP)
    return out, stages, single, trainer


@pytest.fixture(scope="module")
def paci_run(tmp_path_factory):
    """PACI, spawn launcher; fit, then predict with return_predictions=True."""
    out = tmp_path_factory.mktemp("paci")
    return out, _run(out, "--schedule", "paci", "--start-method", "spawn", "--predict", "--return-predictions")


def test_hooks_run_per_stage_as_lightning_runs_them_on_one_device(flush_run):
    """1F1B: every hook in Lightning's order, with the same losses, gradient norms and value
    clipping per stage as one device; grad norms logged on stage 0 reach TensorBoard on rank 0."""
    tmp_path, stages, single, _ = flush_run
    names = [[c[0] for c in single.calls]] * 2
    assert [[c[0] for c in s["calls"]] for s in stages] == names
    assert names[0].count("on_before_backward") == STEPS * M
    assert names[0].count("configure_gradient_clipping") == STEPS
    # on_after_backward sees this stage's parameters with gradients
    own = [set(next(c[1] for c in s["calls"] if c[0] == "on_after_backward")) for s in stages]
    assert own[0] and own[1] and not own[0] & own[1] and own[0] | own[1] == dict(single.named_parameters()).keys()
    for stage, keys in zip(stages, own):
        norm_keys = {f"grad_2.0_norm/{k}" for k in keys}
        expected = [_restrict(c, keys | norm_keys) for c in single.calls]
        actual = [_restrict(c, keys | norm_keys) for c in stage["calls"]]
        _assert_close(actual, expected)
        assert ["configure_gradient_clipping", CLIP, "value"] in actual
    merged = {k: v for f in tmp_path.glob("stage*.pt") for k, v in torch.load(f).items()}
    assert_same(merged, single.state_dict())  # clipping by value went through Lightning's path

    events = _scalars(tmp_path)
    tags = events.Tags()["scalars"]
    first = next(k for k in sorted(own[0]) if "wte" in k)
    last = next(k for k in sorted(own[1]) if "lm_head" in k)
    logged = [e for e in events.Scalars(f"grad_2.0_norm/{first}/stage0")]  # forwarded from stage 0
    assert [e.step for e in logged] == list(range(STEPS))
    steps0 = [c[1] for c in stages[0]["calls"] if c[0] == "on_before_optimizer_step"]
    assert [e.value for e in logged] == pytest.approx([s[f"grad_2.0_norm/{first}"] for s in steps0])
    assert [e.step for e in events.Scalars(f"grad_2.0_norm/{last}")] == list(range(STEPS))
    assert "grad_2.0_norm_total/stage0" in tags and "grad_2.0_norm_total" in tags


def test_paci_calls_every_hook_and_logs_the_last_window_at_the_drain(tmp_path, paci_run):
    """PACI: stage 0 steps a window late (during the next batch, the last one at the end-of-fit
    drain); it still calls every hook in Lightning's order, and every step's norms reach the logger."""
    out, stages = paci_run
    single, _ = _single_process(tmp_path / "single", 0.0)
    names = [c[0] for c in single.calls]
    assert [[c[0] for c in s["calls"]] for s in stages] == [names, names]
    events = _scalars(out)
    wte = "grad_2.0_norm/model.transformer.wte.weight/stage0"
    assert [e.step for e in events.Scalars(wte)] == list(range(STEPS))


def test_norm_clipping_is_allowed_with_the_users_own_configure_gradient_clipping():
    """The user's override decides what clipping means per stage; without one, norm clipping is refused."""
    from lightning_paci import PACIStrategy

    for model, refused in ((HookedTiny(), False), (HookedTiny.__mro__[1](), True)):
        strategy = PACIStrategy(micro_batches=2)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, gradient_clip_val=1.0, max_steps=1,
                            logger=False, enable_checkpointing=False)
        if refused:
            with pytest.raises(ValueError, match="configure_gradient_clipping"):
                strategy._check_module(model, trainer)
        else:
            strategy._check_module(model, trainer)


def test_predict_returns_every_prediction_in_the_main_process(flush_run):
    """popen: trainer.predict on rank 0 (the main process, the last stage) returns each batch's
    predictions, equal to Lightning's single-device predict; the writer runs on the last stage only."""
    out, _, single, trainer = flush_run
    expected = trainer.predict(single, loader(8, n=16, seed=1))
    predictions = torch.load(out / "predictions.pt")
    assert len(predictions) == 2 and predictions[0].shape == (8, 8, 32)
    for actual, wanted in zip(predictions, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-10)
    written = sorted(p.name for p in out.glob("written_rank*"))
    assert written == ["written_rank0_batch0.pt", "written_rank0_batch1.pt"]
    for k, actual in enumerate(predictions):
        torch.testing.assert_close(torch.load(out / f"written_rank0_batch{k}.pt"), actual, rtol=0, atol=0)


def test_predict_under_spawn_returns_predictions_to_the_main_process(paci_run):
    """spawn: return_predictions=True (which Lightning refuses for spawn under DDP) brings the
    predictions back; they equal the trained model's own forward in the main process."""
    out, _ = paci_run
    predictions, direct = torch.load(out / "predictions.pt"), torch.load(out / "direct.pt")
    assert len(predictions) == len(direct) == 2
    for actual, wanted in zip(predictions, direct):
        torch.testing.assert_close(actual, wanted, rtol=1e-10, atol=1e-10)


def test_micro_batch_results_join_along_the_batch_dimension():
    from lightning_paci.batches import join_predictions

    parts = [{"y": torch.full((2, 3), float(k))} for k in range(3)]
    assert join_predictions(parts, [2, 2, 2])["y"].shape == (6, 3)
    scalars = [torch.tensor(1.0), torch.tensor(2.0)]
    assert join_predictions(scalars, [4, 4]) is scalars  # not batch-shaped: the list, in order
