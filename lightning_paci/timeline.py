"""Timelines of pipeline runs: one record type and two writers, shared by simulator and runtime.

The simulator (``simulate.py``) and the multi-process runtime both describe what each stage did
as a list of :class:`TimelineEvent`; the writers here never care which produced them, so a
simulated schedule and a measured one can be drawn side by side and compared by eye.

- :func:`write_chrome_trace` writes Chrome trace-event JSON (open it in https://ui.perfetto.dev or
  ``chrome://tracing``): one track per stage, one "X" complete event per action, microseconds.
- :func:`plot_gantt` draws one Gantt panel per schedule to a PNG (rows = stages).

Pure Python; matplotlib is imported inside :func:`plot_gantt` only, so importing this module
stays cheap for the runtime and the simulator.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

_ACTION_RE = re.compile(r"^([FB])(\d+)$")
# Colours by category, chosen to stay distinguishable in greyscale print as well.
_COLOURS = {"forward": "#4C72B0", "backward": "#DD8452", "step": "#C44E52", "wait": "#D9D9D9",
            "other": "#8C8C8C"}
_LABELS = {"forward": "forward", "backward": "backward", "step": "optimizer step",
           "wait": "waiting (recv/send)", "other": "other"}


class TimelineEvent(NamedTuple):
    """What ``stage`` did from ``start`` to ``end`` (seconds).

    ``action`` is the plan's text form (``"F3"``, ``"B3"``, ``"S"``) or a wait such as ``"recv"`` /
    ``"send"`` (a runtime may append detail after a space, e.g. ``"recv F3"``).
    """

    stage: int
    action: str
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def category(self) -> str:
        """forward, backward, step, wait or other: what the writers colour and group by."""
        head = self.action.split(" ", 1)[0]
        if head == "S":
            return "step"
        if head in ("recv", "send"):
            return "wait"
        if head == "R":  # arming the replicas' all-reduce (its time is spent in the backward and S)
            return "other"
        match = _ACTION_RE.match(head)
        if match is None:
            return "other"
        return "forward" if match.group(1) == "F" else "backward"

    @property
    def micro_batch(self) -> int | None:
        match = _ACTION_RE.match(self.action.split(" ", 1)[0])
        return None if match is None else int(match.group(2))


def _as_mapping(events: Iterable[TimelineEvent] | Mapping[str, Iterable[TimelineEvent]]
                ) -> dict[str, list[TimelineEvent]]:
    if isinstance(events, Mapping):
        return {str(title): list(evs) for title, evs in events.items()}
    return {"pipeline": list(events)}


def chrome_trace(events: Iterable[TimelineEvent] | Mapping[str, Iterable[TimelineEvent]]) -> dict:
    """The trace as a JSON-ready dict; a mapping title -> events gives one process per title.

    Stages become threads (tid = stage), so Perfetto shows one track per stage in stage order.
    """
    trace: list[dict] = []
    for pid, (title, evs) in enumerate(_as_mapping(events).items()):
        trace.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": title}})
        trace.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                      "args": {"sort_index": pid}})
        for stage in sorted({e.stage for e in evs}):
            trace.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": stage,
                          "args": {"name": f"stage {stage}"}})
            trace.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": stage,
                          "args": {"sort_index": stage}})
        for e in sorted(evs, key=lambda e: (e.stage, e.start)):
            args = {} if e.micro_batch is None else {"micro_batch": e.micro_batch}
            trace.append({"ph": "X", "name": e.action, "cat": e.category, "pid": pid, "tid": e.stage,
                          "ts": e.start * 1e6, "dur": e.duration * 1e6, "args": args})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def write_chrome_trace(events: Iterable[TimelineEvent] | Mapping[str, Iterable[TimelineEvent]],
                       path: str | Path) -> Path:
    """Write :func:`chrome_trace` to ``path`` and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(events)))
    return path


def plot_gantt(events_by_title: Mapping[str, Iterable[TimelineEvent]], path: str | Path,
               time_unit: str = "s") -> Path:
    """Draw one Gantt panel per title (stage 0 on top) into a PNG at ``path`` and return it.

    Panels share the time axis so makespans compare directly. A bar carries its micro-batch number
    when it is wide enough on screen for the digits, so small plans read like the plan grid while
    long runs stay uncluttered.
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plot_gantt draws with matplotlib, which the library itself does not need: "
                          'pip install "lightning-paci[recipes]" (or matplotlib)') from error

    matplotlib.use("Agg")  # no display on training nodes; Agg always exists
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = _as_mapping(events_by_title)
    if not panels:
        raise ValueError("plot_gantt needs at least one titled list of events")
    stage_counts = [max((e.stage for e in evs), default=-1) + 1 for evs in panels.values()]
    t_end = max((e.end for evs in panels.values() for e in evs), default=1.0) or 1.0
    width_in = 12.0
    heights = [max(n, 1) * 0.35 + 0.8 for n in stage_counts]
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, sum(heights) + 0.6), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    fig.subplots_adjust(left=0.08, right=0.98)
    px_per_unit = width_in * fig.dpi * 0.9 / t_end  # axis is ~90% of the figure width
    used: set[str] = set()
    for ax, (title, evs), n_stages in zip(axes[:, 0], panels.items(), stage_counts):
        for e in evs:
            used.add(e.category)
            if e.duration * px_per_unit < 1.5:  # a free step still marks when weights change
                ax.vlines(e.start, e.stage - 0.4, e.stage + 0.4, color=_COLOURS[e.category], linewidth=1.5)
                continue
            ax.barh(e.stage, e.duration, left=e.start, height=0.8, color=_COLOURS[e.category],
                    edgecolor="white", linewidth=0.4)
            mb = e.micro_batch
            if mb is not None and e.duration * px_per_unit >= 7 * len(str(mb)) + 4:
                ax.text(e.start + e.duration / 2, e.stage, str(mb), ha="center", va="center",
                        fontsize=7, color="white")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylim(n_stages - 0.5, -0.5)  # stage 0 on top, like the plan grid
        ax.set_yticks(range(n_stages), [f"stage {i}" for i in range(n_stages)], fontsize=8)
        ax.set_xlim(0, t_end)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel(f"time ({time_unit})")
    order = [c for c in _COLOURS if c in used]
    fig.legend(handles=[Patch(color=_COLOURS[c], label=_LABELS[c]) for c in order],
               loc="upper right", ncol=len(order), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return path
