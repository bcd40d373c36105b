"""lightning_paci.memory on CPU: the peak outlives the memory that made it."""

from __future__ import annotations

import torch

from lightning_paci.memory import PeakMemory


def test_cpu_peak_keeps_the_largest_sample_after_the_memory_is_freed() -> None:
    meter = PeakMemory(torch.device("cpu"))
    start = meter.peak
    block = torch.ones(16 * 2**20 // 4)  # 16 MiB, held while sampled
    assert meter.sample() >= start + 15 * 2**20
    del block
    assert meter.in_use() < meter.peak - 15 * 2**20  # freed, but the peak stays
    meter.reset()
    assert abs(meter.peak - meter.in_use()) < 2**20  # starts again from what is in use now
