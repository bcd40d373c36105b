"""The simulator's command line: costs from flags or a measured JSON, the summary and per-stage tables,
and the Gantt chart and Chrome trace of the last m given (the model and its metrics: simulate.py)::

    python -m lightning_paci.simulate --stages 8 --micro-batches 4,8,16,24,32,40 --backward 2
    python -m lightning_paci.simulate --stages 4 --micro-batches 4 --gantt gantt.png --trace trace.json
    python -m lightning_paci.simulate --costs runs/benchmark/costs.json --micro-batches 4

(``python -m lightning_paci.simulate_cli`` is the same command.)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from lightning_paci import simulate
from lightning_paci.schedules import check_schedule
from lightning_paci.simulate import CostModel, SimResult, simulate_schedule
from lightning_paci.timeline import plot_gantt, write_chrome_trace

BASELINE = "1f1b"  # throughput is reported relative to 1F1B-flush, as the paper does


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _per_stage(text: str, n_stages: int, flag: str) -> tuple[float, ...]:
    values = _floats(text)
    if len(values) == 1:
        return tuple(values) * n_stages
    if len(values) != n_stages:
        raise SystemExit(f"{flag} takes one value or {n_stages} (one per stage), got {len(values)}")
    return tuple(values)


def _costs_from_args(args: argparse.Namespace) -> CostModel:
    explicit = [f"--{k}" for k in ("forward", "backward", "step") if getattr(args, k) is not None]
    if args.costs:
        if explicit:
            raise SystemExit(f"--costs gives every stage's costs; drop {', '.join(explicit)}")
        costs = CostModel.from_json(json.loads(Path(args.costs).read_text()))
        if args.stages not in (None, costs.n_stages):
            raise SystemExit(f"--stages {args.stages} but {args.costs} has {costs.n_stages} stages")
        if args.transfer is not None:
            costs = CostModel(costs.forward, costs.backward, costs.step, float(args.transfer))
        return costs
    if args.stages is None:
        raise SystemExit("give --stages N (or --costs telemetry.json)")
    n = args.stages
    return CostModel(_per_stage(args.forward or "1.0", n, "--forward"),
                     _per_stage(args.backward or "2.0", n, "--backward"),
                     _per_stage(args.step or "0.0", n, "--step"), float(args.transfer or 0.0))


def _fmt_costs(values: tuple[float, ...]) -> str:
    return f"{values[0]:g}" if len(set(values)) == 1 else ",".join(f"{v:g}" for v in values)


def _where(r: SimResult) -> str:
    if r.window_batches is None:
        return "whole run (too few batches for a steady window)"
    return f"steady window, batches {r.window_batches[0]}..{r.window_batches[1]} of {r.plan.n_batches}"


def summary(rows: Sequence[tuple[SimResult, SimResult]]) -> str:
    """One line per (result, its pipe_1f1b baseline): throughput, ratio, closed form, bubble."""
    costs = rows[0][0].costs
    lines = [(f"forward {_fmt_costs(costs.forward)}, backward {_fmt_costs(costs.backward)}, step "
              f"{_fmt_costs(costs.step)}, transfer {costs.transfer:g}; model = (m+N-1)/m, the paper's "
              f"paci / pipe_1f1b throughput ratio"),
             (f"{'schedule':<11} {'N':>3} {'m':>4} {'a':>4} {'throughput':>10} {'vs pipe_1f1b':>12} "
              f"{'model':>7} {'bubble':>7} {'util':>6}  measured over")]
    for r, base in rows:
        n, m = r.plan.n_stages, r.plan.micro_batches
        lines.append(f"{r.name:<11} {n:>3} {m:>4} {r.plan.accumulation:>4} {r.rate():>10.4g} "
                     f"{r.rate() / base.rate():>12.5f} {(m + n - 1) / m:>7.5f} {r.bubble():>7.4f} "
                     f"{r.utilization():>6.4f}  {_where(r)}")
    return "\n".join(lines)


def stage_table(r: SimResult) -> str:
    """Per-stage rows; util and bubble over the steady window when there is one."""
    steady = r.window is not None
    lines = [f"{r.name}: per stage, util/bubble over the {_where(r)}; 'whole' = whole-run util",
             (f"{'stage':>5} {'busy':>9} {'util':>6} {'bubble':>7} {'whole':>6} {'peak_in_flight':>14} "
              f"{'max_drift':>9} {'steps':>5}  drift histogram (drift:micro-batches)")]
    for s in r.stages:
        util = s.steady_utilization if steady else s.utilization
        hist = " ".join(f"{d}:{c}" for d, c in s.drift_histogram.items())
        lines.append(f"{s.stage:>5} {s.busy:>9.4g} {util:>6.3f} {1 - util:>7.3f} {s.utilization:>6.3f} "
                     f"{s.peak_in_flight:>14} {s.max_drift:>9} {s.steps:>5}  {hist}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_paci.simulate",
                                     description=simulate.__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, help="number of pipeline stages N")
    parser.add_argument("--micro-batches", default="8",
                        help="m per global batch; a comma list prints one summary per m")
    parser.add_argument("--schedules", default="paci,pipe_1f1b,pipe_gpipe",
                        help="comma list of strategy (pipe_1f1b) or plan (1f1b) names")
    parser.add_argument("--accumulation", type=int, help="backwards per optimizer step (default m)")
    parser.add_argument("--batches", type=int, help="global batches simulated (default max(8, 8N/m))")
    for flag, default in (("forward", 1.0), ("backward", 2.0), ("step", 0.0)):
        parser.add_argument(f"--{flag}", help=f"{flag} cost, one value or a comma list per stage "
                                              f"(default {default})")
    parser.add_argument("--transfer", type=float, help="latency of one stage-to-stage hop (default 0)")
    parser.add_argument("--costs", help="JSON of measured per-stage costs (see module docstring)")
    parser.add_argument("--replicas", type=int, default=1, help="data-parallel replicas R (plans gain R)")
    parser.add_argument("--allreduce", help="seconds to all-reduce a stage's gradients over its replicas, "
                                            "one value or one per stage (default 0)")
    parser.add_argument("--gantt", help="write a Gantt chart PNG of --gantt-batches batches")
    parser.add_argument("--gantt-batches", type=int, default=2, help="batches drawn in the Gantt chart")
    parser.add_argument("--trace", help="write a Chrome/Perfetto trace JSON of the full run")
    parser.add_argument("--waits", action="store_true", help="include idle waits in Gantt and trace")
    args = parser.parse_args(argv)
    costs = _costs_from_args(args)
    if args.allreduce:
        costs = replace(costs, allreduce=_per_stage(args.allreduce, costs.n_stages, "--allreduce"))
    try:
        names = [check_schedule(s.strip()) for s in args.schedules.split(",") if s.strip()]
    except ValueError as err:
        raise SystemExit(str(err)) from err
    rows, micro_batches = [], [int(v) for v in args.micro_batches.split(",")]
    for m in micro_batches:
        kwargs = {"micro_batches": m, "accumulation": args.accumulation, "n_batches": args.batches,
                  "record_waits": args.waits, "replicas": args.replicas}
        results = [simulate_schedule(s, costs, **kwargs) for s in names]
        baseline = next((r for r in results if r.plan.schedule == BASELINE), None)
        baseline = baseline or simulate_schedule(BASELINE, costs, **kwargs)
        rows += [(r, baseline) for r in results]
    print(summary(rows))
    if len(micro_batches) == 1:  # per-stage detail only reads well for one m
        for r in results:
            print("\n" + stage_table(r))
    # Drawings use the last m given: one chart per schedule is what a reader compares.
    if args.trace:
        print(f"trace: {write_chrome_trace({r.name: r.events for r in results}, args.trace)}")
    if args.gantt:
        kwargs["n_batches"] = args.gantt_batches
        short = {r.name: simulate_schedule(r.plan.schedule, costs, **kwargs).events for r in results}
        print(f"gantt: {plot_gantt(short, args.gantt)}")


if __name__ == "__main__":
    main()
