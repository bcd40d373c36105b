"""Peak memory of one run, comparable between runs made one after another in the same process.

On CUDA this is the caching allocator's peak (``torch.cuda.max_memory_allocated``), reset when a
run starts. On CPU there are no allocator statistics and the process's resident-set high-water mark
never goes down, so the meter samples glibc's heap in use (``mallinfo2``: arena plus mmapped bytes)
after every action and keeps the largest sample. Where mallinfo2 is missing (not glibc) it falls
back to the resident set size now, which may not shrink after a run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _mallinfo2():  # -> callable returning _MallInfo2, or None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


class PeakMemory:
    """``sample()`` after each unit of work; ``peak`` is the largest bytes-in-use seen since ``reset()``.

    On CUDA the allocator keeps the peak itself: ``sample()`` does nothing and ``peak`` reads it.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._mallinfo = _mallinfo2() if device.type == "cpu" else None
        self._peak = 0
        self.reset()

    @property
    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self._peak

    def in_use(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        if self._mallinfo is not None:
            info = self._mallinfo()
            return int(info.uordblks + info.hblkhd)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = self.in_use()

    def sample(self) -> int:
        if self.device.type != "cuda":
            self._peak = max(self._peak, self.in_use())
        return self.peak
