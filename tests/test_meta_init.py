"""Layers built in ``configure_model`` start on the meta device; each stage materializes only its own."""

from __future__ import annotations

import lightning as L
import torch

from lightning_paci.materialize import materialize
from lightning_paci.partition import partition_model
from tests.models import LitMeta, LitTiny
from tests.reference import batches, train_reference
from tests.test_pipeline_correctness import BATCH, LAYERS, STEPS, M, assert_same, run_pipeline


def _built_like_a_stage() -> LitMeta:
    L.seed_everything(0, verbose=False)
    lit = LitMeta(n_layers=LAYERS, dtype=torch.float64)
    with torch.device("meta"):
        lit.configure_model()
    materialize(lit, torch.device("cpu"))
    return lit


def test_materialized_weights_do_not_depend_on_the_split():
    whole = _built_like_a_stage()
    L.seed_everything(0, verbose=False)
    parts = LitMeta(n_layers=LAYERS, dtype=torch.float64)
    with torch.device("meta"):
        parts.configure_model()
    units = partition_model(parts, 2).stage_units(1)
    materialize(parts, torch.device("cpu"), skip=[u for u in partition_model(parts, 2).units if u not in units])
    own = {k: v for k, v in parts.state_dict().items() if not v.is_meta}
    assert own and len(own) < len(whole.state_dict())
    assert_same(own, {k: whole.state_dict()[k] for k in own})


def test_configure_model_on_meta_trains_as_one_process(tmp_path):
    result, params = run_pipeline(tmp_path, "--meta-init", "--schedule", "1f1b", "--stages", "2",
                                  "--steps", str(STEPS), "--micro-batches", str(M), "--start-method", "spawn")
    assert_same(params, train_reference(LAYERS, batches(BATCH, STEPS), lit=_built_like_a_stage()))
    # Each stage process held its own parameters only: the rest stayed on the meta device.
    partition = partition_model(_built_like_a_stage(), 2)
    held = [t["parameters"] for t in sorted(result["telemetry"], key=lambda t: t["stage"])]
    assert held == [partition.stage_params(i) for i in range(2)]


def test_init_module_empty_init_builds_on_meta_and_trains_as_one_process(tmp_path):
    """``trainer.init_module(empty_init=True)`` (Lightning's way for big models outside configure_model):
    every stage process starts from meta tensors, materializes its own units, and the run matches one
    process trained from the same materialized weights; the spawn launcher's main process gets the
    whole trained model back."""
    result, params = run_pipeline(tmp_path, "--init-module", "--schedule", "gpipe", "--stages", "2",
                                  "--steps", str(STEPS), "--micro-batches", str(M), "--start-method", "spawn")
    L.seed_everything(0, verbose=False)
    with torch.device("meta"):
        whole = LitTiny(n_layers=LAYERS, dtype=torch.float64)
    materialize(whole, torch.device("cpu"))
    assert_same(params, train_reference(LAYERS, batches(BATCH, STEPS), lit=whole))
    held = [t["parameters"] for t in sorted(result["telemetry"], key=lambda t: t["stage"])]
    assert sum(held) == sum(p.numel() for p in whole.parameters()) and min(held) > 0
