"""Weights tied across stages (GPT-2's and nanoGPT's ``wte``/``lm_head``), as Megatron's embedding group.

Each stage that uses a tied parameter holds its own real copy: hollow units of other stages are
moved to meta one by one (hollow.py), so the embedding's stage keeps the tensor under the
embedding's name and the head's stage keeps it under the head's name. Before every optimizer step
the stages holding a copy sum their gradients with ``all_reduce`` on a process group of just those
ranks, and each steps its copy with the same optimizer settings, so the copies stay equal to one
another and to the single tensor of one-process training (the sum is what autograd accumulates
there). The group is created identically on every rank, in partition order.

Deadlock freedom (NCCL too): the reduce is a collective on a group of its own, issued at the S
action, and under the flush schedules every holder runs exactly one S per window in the same order.
No holder needs anything from another holder between its window's last backward and its S: the
last backward's messages are already posted, and the next forward needs the step done.

PACI is refused: its stages step at different times (the first stage ``N-1`` updates ahead of the
last), so a synchronous reduce would stall the pipeline at every step, which PACI exists to avoid;
carrying the head's share of the gradient with the pipeline's own messages (bounded-stale copies)
is not built.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from lightning_paci.partition import Partition


def check_tied_schedule(partition: Partition, schedule: str) -> None:
    """PACI cannot keep tied copies in step without a global sync; say what works instead."""
    if partition.tied and schedule == "paci":
        pairs = "; ".join(" = ".join(f"{name} (stage {s})" for name, s in group) for group in partition.tied)
        raise ValueError(
            f"tied weights across stages ({pairs}) need their gradients summed before every step, a sync "
            "between those stages that the asynchronous schedule avoids. Use schedule='1f1b' or 'gpipe' "
            "(strategy='pipe_1f1b'), which sum them exactly as one-process training does; or untie them "
            "(e.g. tie_word_embeddings=False); or pass split_points that keep both uses on one stage")


class TiedGradients:
    """Sums this stage's tied parameters' gradients with the other holders' (a collective per group)."""

    def __init__(self, model: nn.Module, partition: Partition, stage: int, rank_of: list[int],
                 timeout: timedelta | None = None) -> None:
        self.reductions: list[tuple[nn.Parameter, object]] = []
        for group in partition.tied:
            stages = sorted({s for _, s in group})
            # every rank creates every group, in the same order (torch.distributed requires it)
            handle = dist.new_group([rank_of[s] for s in stages], timeout=timeout)
            if stage in stages:
                name = next(n for n, s in group if s == stage)
                self.reductions.append((model.get_parameter(name), handle))

    def __call__(self) -> None:
        for param, group in self.reductions:
            if param.grad is None:  # this stage's use got no gradient in the window: its share is zero
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad, group=group)
