"""Time the schedules' plans under an explicit cost model: bubble, utilization, drift, memory.

The simulator reads the very plans the runtime executes (``schedules.PlanSpec``), so what it
reports is a property of the schedule, not of a second implementation of it. Semantics:

- a stage runs its plan's actions in order, one at a time;
- F(j) on stage i>0 starts no earlier than F(j) ended on stage i-1 plus ``transfer``; B(j) on
  stage i<N-1 no earlier than B(j) ended on stage i+1 plus ``transfer``; sends never block;
- F, B and S on stage i last ``forward[i]``, ``backward[i]`` and ``step[i]``;
- with data-parallel replicas, R takes no stage time: the all-reduce of stage i's gradients
  (``allreduce[i]``) starts with the backward after R, beside it (overlapped), and S starts no
  earlier than its end. Replicas are identical, so one replica's timeline is simulated.

Each action starts at the later of "its stage is free" and "its input has arrived", so the
timeline is the earliest-start schedule of the plan's dependency graph; nothing else is modelled.

Metrics. ``utilization`` of a stage is busy time / makespan of the *whole run*, warm-up and drain
included; ``bubble`` = 1 - utilization. ``steady_*`` values measure the same over a middle window
of batches instead, from the end of stage 0's last backward of batch k0 to that of batch k1
(k0 = n/4, k1 = n-1-n/4, k1 also before the drain reaches stage 0), so that the warm-up and drain
edges of a long run do not dominate. Flush schedules repeat exactly once per batch, so their steady
values are per-batch values: bubble (N-1)/(m+N-1) with equal costs. PACI's steady bubble is 0.

Fidelity limits: no contention (compute and communication overlap for free and never slow each other
down; a stage has unlimited send/receive buffers); transfer is one fixed latency for every hop and
direction, with no bandwidth or message-size term; costs are constant per stage (no variance, no
warm-up, no dependence on weight version); no memory model beyond counting in-flight micro-batches;
no collective communication, data loading, validation or checkpoint time.

Measured costs (``--costs``): a JSON list with one dict per stage holding mean seconds,
``[{"forward_s": 0.012, "backward_s": 0.025, "step_s": 0.003}, ...]``, or an object
``{"stages": [...], "transfer_s": 0.0004}``. These keys are required per stage (a misspelt key
fails); other keys, such as the runtime telemetry's counters, are ignored.

``throughput`` is micro-batches per time unit over the whole run, ``steady_throughput`` over the
window; ratios between schedules use the steady value when the run has a window.

The paper's bubble model, paci / 1f1b-flush throughput = (m+N-1)/m, comes out exactly whenever all
stages cost the same and step and transfer are free, whatever backward/forward ratio (1, 2 and 3 are
tested): the flush pays (N-1)(f+b) per batch, PACI's steady state none. It is only approximate
otherwise: step time counts as work for both (N=8, m=8, b=2f, step 0.5f: 1.857 vs 1.875); a hop
latency t leaves PACI a steady bubble too, as N-i in flight cannot hide the round trip (t=0.1f:
5.5% bubble, ratio 1.874); and an uneven split makes the slowest stage set the pace of both.

Reproduce the model for N=8, and draw a small case (the command line is simulate_cli.py)::

    python -m lightning_paci.simulate --stages 8 --micro-batches 4,8,16,24,32,40 --backward 2
    python -m lightning_paci.simulate --stages 4 --micro-batches 4 --gantt gantt.png --trace trace.json
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lightning_paci.dataflow import advance
from lightning_paci.plan import (
    ALLREDUCE,
    BACKWARD,
    FORWARD,
    STEP,
    Action,
    Plan,
    drift_histogram,
    max_drift,
    peak_in_flight,
)
from lightning_paci.schedules import STRATEGY_NAMES, PlanSpec
from lightning_paci.timeline import TimelineEvent


@dataclass(frozen=True)
class CostModel:
    """Seconds (or any unit) per forward, backward and optimizer step on each stage, plus one hop."""

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    step: tuple[float, ...]
    transfer: float = 0.0
    allreduce: tuple[float, ...] = ()  # seconds per stage to all-reduce its gradients; () = free

    def __post_init__(self) -> None:
        allreduce = tuple(float(v) for v in self.allreduce) or (0.0,) * len(self.forward)
        object.__setattr__(self, "allreduce", allreduce)
        if len(self.allreduce) != len(self.forward) or any(v < 0 for v in self.allreduce):
            raise ValueError(f"allreduce needs one cost >= 0 per stage, got {self.allreduce}")
        for name in ("forward", "backward", "step"):
            values = tuple(float(v) for v in getattr(self, name))
            object.__setattr__(self, name, values)  # accept lists, store hashable tuples
            if any(v < 0 for v in values):
                raise ValueError(f"{name} costs must be >= 0, got {values}")
        if not len(self.forward) == len(self.backward) == len(self.step) >= 1:
            raise ValueError(f"need one forward, backward and step cost per stage, got "
                             f"{len(self.forward)}, {len(self.backward)} and {len(self.step)}")
        if self.transfer < 0:
            raise ValueError(f"transfer must be >= 0, got {self.transfer}")

    @property
    def n_stages(self) -> int:
        return len(self.forward)

    @classmethod
    def uniform(cls, n_stages: int, forward: float = 1.0, backward: float = 2.0, step: float = 0.0,
                transfer: float = 0.0) -> CostModel:
        """Every stage alike; backward defaults to 2x forward, the usual ratio for matmul layers."""
        return cls((forward,) * n_stages, (backward,) * n_stages, (step,) * n_stages, transfer)

    @classmethod
    def from_json(cls, data: object) -> CostModel:
        """Costs from telemetry JSON (format in the module docstring)."""
        transfer = 0.0
        if isinstance(data, dict):
            if "stages" not in data:
                raise ValueError(f"cost JSON object needs a 'stages' list, got keys {sorted(data)}")
            data, transfer = data["stages"], float(data.get("transfer_s", 0.0))
        if not isinstance(data, list) or not data:
            raise ValueError("cost JSON must be a non-empty list of per-stage dicts")
        columns = {}
        for key in ("forward_s", "backward_s", "step_s"):
            missing = [i for i, row in enumerate(data) if key not in row]
            if missing:
                raise ValueError(f"cost JSON: stages {missing} lack {key!r} (need forward_s, "
                                 f"backward_s and step_s per stage)")
            columns[key] = [float(row[key]) for row in data]
        return cls(columns["forward_s"], columns["backward_s"], columns["step_s"], transfer)


def run_plan(plan: Plan, costs: CostModel, record_waits: bool = False,
             durations: Sequence[Sequence[float]] | None = None) -> tuple[TimelineEvent, ...]:
    """Earliest-start timeline of ``plan``; ``record_waits`` adds "recv" events for idle gaps.

    ``durations``, one list per stage with one value per action of its plan, replaces the cost
    model's per-stage means (``costs`` then gives only the transfer): see :func:`replay`.

    Stages advance in dependency order (``dataflow.advance``): an action is timed once its input's
    action has ended, so its start is final when it is timed.
    """
    n = plan.n_stages
    if costs.n_stages != n:
        raise ValueError(f"cost model has {costs.n_stages} stages, plan has {n}")
    if durations is not None and [len(d) for d in durations] != [len(a) for a in plan.stages]:
        raise ValueError(f"durations give {[len(d) for d in durations]} actions per stage, the plan has "
                         f"{[len(a) for a in plan.stages]}")
    duration = {FORWARD: costs.forward, BACKWARD: costs.backward, STEP: costs.step, ALLREDUCE: (0.0,) * n}
    clock = [0.0] * n
    reduced = [0.0] * n  # when the all-reduce started by each stage's last R ends
    ended: list[dict] = [{} for _ in range(n)]
    events: list[TimelineEvent] = []

    def run(i: int, k: int, action: Action) -> bool:
        source = {FORWARD: i - 1, BACKWARD: i + 1}.get(action.kind, -1)
        start = clock[i]
        if 0 <= source < n:
            if action not in ended[source]:
                return False  # its input has not been computed yet
            start = max(start, ended[source][action] + costs.transfer)
        if k and plan.stages[i][k - 1].kind == ALLREDUCE:
            reduced[i] = start + costs.allreduce[i]  # it runs beside this (the window's last) backward
        if action.kind == STEP:
            start = max(start, reduced[i])
        if record_waits and start > clock[i]:
            events.append(TimelineEvent(i, "recv", clock[i], start))
        took = duration[action.kind][i] if durations is None else durations[i][k]
        clock[i] = ended[i][action] = start + took
        events.append(TimelineEvent(i, str(action), start, clock[i]))
        return True

    cursor = advance(plan.stages, run)
    stuck = [i for i in range(n) if cursor[i] < len(plan.stages[i])]
    if stuck:
        raise ValueError(f"plan deadlocks at stage {stuck[0]}\n" + plan.grid(mark=(stuck[0], cursor[stuck[0]])))
    return tuple(events)


def replay(plan: Plan, timeline: Iterable[TimelineEvent], transfer: float = 0.0) -> tuple[TimelineEvent, ...]:
    """``plan`` re-timed with the durations a real run measured for each of its actions.

    ``timeline`` is the run's (the runtime's ``record_timeline``; waits and other events are
    ignored); its forwards, backwards and steps must be the plan's, in order. The result is the
    timeline the same compute would have had with nothing between actions and ``transfer`` per
    hop: what the schedule allows given the run's own action times, their jitter included. The
    run's measured timeline minus this one is the time its runtime, trainer and messages cost.
    """
    events = sorted(timeline, key=lambda e: e.start)
    durations = []
    for i, actions in enumerate(plan.stages):
        mine = [e for e in events if e.stage == i and e.category in ("forward", "backward", "step")]
        expected = [str(a) for a in actions]
        got = [e.action.split(" ", 1)[0] for e in mine]
        if got != expected:
            at = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            raise ValueError(f"stage {i}'s timeline does not follow the plan: action {at} is "
                             f"{got[at] if at < len(got) else 'missing'}, the plan has "
                             f"{expected[at] if at < len(expected) else 'nothing'} ({len(got)} actions "
                             f"recorded, {len(expected)} planned)")
        durations.append([e.duration for e in mine])
    return run_plan(plan, CostModel.uniform(plan.n_stages, transfer=transfer), durations=durations)


def steady_batches(n_batches: int, micro_batches: int, n_stages: int) -> tuple[int, int] | None:
    """Batches (k0, k1) bounding the steady window, or None when the run is too short for one.

    k1 also keeps the window before stage 0's drain: stage 0 stops forwarding N-1 micro-batches
    before its last backward.
    """
    k0 = n_batches // 4
    k1 = min(n_batches - 1 - n_batches // 4, (n_batches * micro_batches - n_stages + 1) // micro_batches - 1)
    return (k0, k1) if k1 > k0 else None


def default_batches(n_stages: int, micro_batches: int) -> int:
    """Enough batches that the steady window holds >= 4N micro-batches well clear of the edges."""
    return max(8, math.ceil(8 * n_stages / micro_batches))


@dataclass(frozen=True)
class StageReport:
    """One stage's measures; ``busy`` and ``utilization`` cover the whole run."""

    stage: int
    busy: float
    utilization: float  # busy / makespan, whole run
    steady_utilization: float | None  # busy / window length over the steady window
    peak_in_flight: int
    max_drift: int
    drift_histogram: dict[int, int]
    steps: int

    @property
    def bubble(self) -> float:
        return 1.0 - self.utilization

    @property
    def steady_bubble(self) -> float | None:
        return None if self.steady_utilization is None else 1.0 - self.steady_utilization


@dataclass(frozen=True)
class SimResult:
    """One simulated plan: whole-run and steady-window measures, per stage, and the timeline."""

    plan: Plan
    costs: CostModel
    events: tuple[TimelineEvent, ...]
    makespan: float
    throughput: float  # micro-batches per time unit over the whole run
    window: tuple[float, float] | None  # steady window (start, end) in time
    window_batches: tuple[int, int] | None
    steady_throughput: float | None
    stages: tuple[StageReport, ...]

    @property
    def name(self) -> str:
        return STRATEGY_NAMES[self.plan.schedule]

    def utilization(self, steady: bool = True) -> float:
        """Mean stage utilization, over the steady window when asked and available."""
        if steady and self.window is not None:
            return sum(s.steady_utilization for s in self.stages) / len(self.stages)
        return sum(s.utilization for s in self.stages) / len(self.stages)

    def bubble(self, steady: bool = True) -> float:
        return 1.0 - self.utilization(steady)

    def rate(self, steady: bool = True) -> float:
        return self.steady_throughput if steady and self.window is not None else self.throughput


def simulate(plan: Plan, costs: CostModel, record_waits: bool = False) -> SimResult:
    """Time ``plan`` under ``costs`` and measure it (definitions in the module docstring)."""
    events = run_plan(plan, costs, record_waits)
    work = [e for e in events if e.category != "wait"]
    makespan = max((e.end for e in work), default=0.0)
    n_micro = plan.n_batches * plan.micro_batches
    window_batches = steady_batches(plan.n_batches, plan.micro_batches, plan.n_stages)
    window = None
    if window_batches is not None:
        ends = {e.action: e.end for e in work if e.stage == 0}
        t0, t1 = (ends[f"B{(k + 1) * plan.micro_batches - 1}"] for k in window_batches)
        window = (t0, t1) if t1 > t0 else None  # free backwards would leave nothing to measure
        window_batches = window_batches if window else None
    stages = []
    for i, actions in enumerate(plan.stages):
        mine = [e for e in work if e.stage == i]
        busy = sum(e.duration for e in mine)
        steady = None
        if window is not None:
            overlap = sum(max(0.0, min(e.end, window[1]) - max(e.start, window[0])) for e in mine)
            steady = overlap / (window[1] - window[0])
        stages.append(StageReport(i, busy, busy / makespan if makespan else 0.0, steady,
                                  peak_in_flight(actions), max_drift(actions), drift_histogram(actions),
                                  sum(a.kind == STEP for a in actions)))
    steady_rate = None
    if window is not None:
        steady_rate = (window_batches[1] - window_batches[0]) * plan.micro_batches / (window[1] - window[0])
    return SimResult(plan, costs, events, makespan, n_micro / makespan if makespan else 0.0, window,
                     window_batches, steady_rate, tuple(stages))


def simulate_schedule(schedule: str, costs: CostModel, micro_batches: int, accumulation: int | None = None,
                      n_batches: int | None = None, record_waits: bool = False, replicas: int = 1) -> SimResult:
    """Build the plan for ``schedule`` (either name form) and simulate it; defaults as the CLI's."""
    n = costs.n_stages
    spec = PlanSpec(schedule, n, micro_batches, accumulation or micro_batches, replicas)
    return simulate(spec.plan(n_batches or default_batches(n, micro_batches)), costs, record_waits)


if __name__ == "__main__":  # ``python -m lightning_paci.simulate``: the command line is simulate_cli.py's
    # run by name, so that this module does not import its own command line (tests/test_layout.py)
    import runpy

    runpy.run_module("lightning_paci.simulate_cli", run_name="__main__")
