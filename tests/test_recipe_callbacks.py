"""The recipe's throughput callback counts the samples of each data-parallel replica once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import RunningStage

from recipes.callbacks import PipelineThroughput


def _trainer(world_size: int, sampler: dict | None) -> SimpleNamespace:
    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    if sampler is not None:
        strategy.distributed_sampler_kwargs = sampler
    return SimpleNamespace(precision_plugin=Precision(), strategy=strategy, world_size=world_size,
                           enable_validation=True, state=SimpleNamespace(stage=RunningStage.TRAINING))


@pytest.mark.parametrize(("world_size", "sampler", "replicas"), [
    (4, {"num_replicas": 2, "rank": 0}, 2),  # 2 replicas x 2 stages: stages of a replica read the same batches
    (2, {"num_replicas": 1, "rank": 0}, 1),  # one 2-stage pipeline
    (1, None, 1),                            # one process (SingleDeviceStrategy has no sampler arguments)
])
def test_global_rate_counts_replicas_not_processes(world_size: int, sampler: dict | None, replicas: int) -> None:
    monitor = PipelineThroughput(window_size=2)
    monitor.setup(_trainer(world_size, sampler), None, "fit")
    train = monitor._throughputs[RunningStage.TRAINING]
    batch = (torch.zeros(8, 32, dtype=torch.long), torch.zeros(8, 32, dtype=torch.long))
    for k in (1, 2):  # what ThroughputMonitor._update passes after each batch, one second apart
        train.update(time=float(k), batches=k, samples=k * 8, lengths=k * monitor.length_fn(batch))
    rates = train.compute()
    assert rates["device/items_per_sec"] == 256.0  # one replica: 8 x 32 tokens per second
    assert rates.get("items_per_sec") == (256.0 * replicas if replicas > 1 else None)
