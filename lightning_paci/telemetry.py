"""One stage's telemetry: where its time went (busy, waiting, idle), drift, in-flight peak, memory.

The runtime marks each action's start and end on its clock (clock.py: CUDA events on a GPU, the host
clock on CPU) and the waits inside it (p2p.py). Marks are turned into seconds later, at drains, when
telemetry is read, and every ``SETTLE_EVERY`` actions for those the device has already passed, so
measuring never makes the host wait for the device.

A stage holding a copy of a weight tied across stages under PACI adds (tied.py): ``tied_lag_bound``,
the owner steps its copy may lag by (read off the plan), ``tied_lag_max`` and ``tied_lag_last``, the
lag it had after its steps, and ``tied_buffer_peak_bytes``, the most bytes its tied messages held at
once (received weights, shares not yet sent; also inside ``peak_memory_bytes``).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

from lightning_paci.memory import PeakMemory
from lightning_paci.timeline import TimelineEvent

SETTLE_EVERY = 512  # actions between non-blocking settles of clock marks


class StageTelemetry:
    def __init__(self, stage: int, device: torch.device, clock: Any, record_timeline: bool) -> None:
        self.stage, self.clock = stage, clock
        self.drift = Counter()  # optimizer steps between a micro-batch's forward and its backward
        self.peak_in_flight = 0
        self.busy_s = self.wall_s = self.wait_s = 0.0
        self.time_of = {"F": [0.0, 0], "B": [0.0, 0], "S": [0.0, 0], "R": [0.0, 0]}
        self.timeline: list[TimelineEvent] | None = [] if record_timeline else None
        self.memory = PeakMemory(device)
        self.origin = time.perf_counter()  # timeline times count from here; one clock per host
        # Clock marks not yet turned into seconds: (kind, label, start, end, waits) of each action, and
        # (start, end, waits) of spans that count as wall time (a batch, a drain).
        self._actions: list[tuple[str, str, Any, Any, list]] = []
        self._spans: list[tuple[Any, Any, list]] = []

    def action(self, kind: str, label: str, start: Any, end: Any, waits: list) -> None:
        self._actions.append((kind, label, start, end, waits))
        self.memory.sample()

    def span(self, start: Any, end: Any, waits: list) -> None:
        """Wall time: a batch (with the loop's time before it: idle, not busy) or a drain."""
        self._spans.append((start, end, waits))
        if len(self._actions) >= SETTLE_EVERY:
            self.settle(block=False)

    def settle(self, block: bool) -> None:
        """Turn the clock marks of finished actions into seconds and timeline events; with
        ``block=False`` only those already complete (on CUDA: events the stream has passed)."""
        seconds = self.clock.seconds
        done = 0
        for kind, label, t0, t1, waits in self._actions:
            if not block and not self.clock.ready(t1):
                break
            t0, t1 = seconds(t0), seconds(t1)
            waits = [(seconds(a), seconds(b), what) for a, b, what in waits]
            waited = sum(b - a for a, b, _ in waits)
            self.busy_s += (t1 - t0) - waited
            self.wait_s += waited
            self.time_of[kind][0] += (t1 - t0) - waited
            self.time_of[kind][1] += 1
            if self.timeline is not None:
                self._record(label, t0, t1, waits)
            done += 1
        del self._actions[:done]
        done = 0
        for start, end, waits in self._spans:
            if not block and not self.clock.ready(end):
                break
            self.wall_s += seconds(end) - seconds(start)
            self.wait_s += sum(seconds(b) - seconds(a) for a, b, _ in waits)
            done += 1
        del self._spans[:done]

    def _record(self, label: str, t0: float, t1: float, waits: list[tuple[float, float, str]]) -> None:
        """Timeline events of one action: waits for its input ("recv F3"), its compute, then send
        back-pressure ("send F3"); every handler receives before it computes and sends after."""
        o = self.origin
        begin = max((end for _, end, kind in waits if kind == "recv"), default=t0)
        end = min((start for start, _, kind in waits if kind == "send"), default=t1)
        if begin > t0:
            self.timeline.append(TimelineEvent(self.stage, f"recv {label}", t0 - o, begin - o))
        self.timeline.append(TimelineEvent(self.stage, label, begin - o, end - o))
        if end < t1:
            self.timeline.append(TimelineEvent(self.stage, f"send {label}", end - o, t1 - o))

    def summary(self, optimizer_steps: int, parameters: int) -> dict[str, Any]:
        self.settle(block=True)
        wall = max(self.wall_s, 1e-12)
        mean = {k: (t / n if n else 0.0) for k, (t, n) in self.time_of.items()}
        return {
            "stage": self.stage,
            "max_drift": max(self.drift, default=0),
            "drift_histogram": dict(sorted(self.drift.items())),
            "utilization": self.busy_s / wall,
            "bubble_fraction": self.wait_s / wall,
            "peak_in_flight": self.peak_in_flight,
            "optimizer_steps": optimizer_steps,
            "peak_memory_bytes": self.memory.peak,
            "busy_s": self.busy_s,
            "wait_s": self.wait_s,
            "wall_s": self.wall_s,
            "forward_s": mean["F"],
            "backward_s": mean["B"],
            "step_s": mean["S"],  # with replicas: includes waiting for the window's all-reduce to end
            "parameters": parameters,
        }


def flat_telemetry(telemetry: list[dict[str, Any]]) -> dict[str, float]:
    """Every stage's numbers as logger metrics: ``pipeline/stage{i}/{name}``, and
    ``pipeline/replica{r}/stage{i}/{name}`` with data-parallel replicas."""
    out = {}
    for t in telemetry:
        replica = f"replica{t['replica']}/" if "replica" in t else ""
        prefix = f"pipeline/{replica}stage{t['stage']}"
        for key, value in t.items():
            if isinstance(value, (int, float)) and key not in ("stage", "replica"):
                out[f"{prefix}/{key}"] = float(value)
        for drift, count in t["drift_histogram"].items():
            out[f"{prefix}/drift_{drift}"] = float(count)
    return out


def publish_telemetry(own: dict[str, Any], rank: int, world_size: int,
                      trainer: Any) -> list[dict[str, Any]] | None:
    """Collective: every stage's telemetry, by (replica, stage), on rank 0 (None elsewhere), where it is
    also logged to the trainer's loggers at the current global step."""
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, own)
    if rank != 0:
        return None
    telemetry = sorted(gathered, key=lambda t: (t.get("replica", 0), t["stage"]))
    for logger in trainer.loggers:
        logger.log_metrics(flat_telemetry(telemetry), step=trainer.global_step)
    return telemetry
