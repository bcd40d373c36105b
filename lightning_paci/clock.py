"""When each action ran: host time on CPU, CUDA events on a GPU, read back only when settled.

On a GPU, kernels run asynchronously: ``perf_counter`` around an action measures how long the host
took to queue it, and an NCCL ``wait()`` returns at once (it makes the compute stream wait, not the
host). So the runtime asks its clock for *marks* (``mark()``) around every action and every wait
and turns them into seconds later (``seconds()``), once they are complete: on CPU a mark is the time
itself; on CUDA it is an event recorded on the current stream, which completes when the stream
reaches it, so a wait's two marks span the time the stream was blocked. The runtime settles its
marks at drains and, between drains, every few hundred actions for those already complete
(``ready``), so reading times never stalls the pipeline. Seconds share ``perf_counter``'s time base
on both clocks, so timelines of all stages of a host line up.
"""

from __future__ import annotations

import time
from typing import Any

import torch


class HostClock:
    """CPU: a mark is ``perf_counter()``."""

    def mark(self) -> float:
        return time.perf_counter()

    def ready(self, mark: Any) -> bool:
        return True

    def seconds(self, mark: Any) -> float:
        return mark


class CudaEventClock:
    """CUDA: a mark is an event recorded on the device's current stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        torch.cuda.synchronize(device)
        self._origin = torch.cuda.Event(enable_timing=True)
        self._origin.record(torch.cuda.current_stream(device))
        self._origin.synchronize()
        self._origin_host = time.perf_counter()

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def ready(self, mark: torch.cuda.Event) -> bool:
        return mark.query()

    def seconds(self, mark: torch.cuda.Event) -> float:
        mark.synchronize()
        return self._origin_host + self._origin.elapsed_time(mark) / 1e3


def clock_for(device: torch.device) -> HostClock | CudaEventClock:
    return CudaEventClock(device) if device.type == "cuda" else HostClock()
