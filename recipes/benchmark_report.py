"""The benchmark's report: summary over rounds, goal verdicts, simulator check, table and drawings.

recipes/benchmark.py measures (one process per stage); this module only reads its run records,
so the arithmetic is testable without processes (tests/test_benchmark.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_paci.schedules import STRATEGY_NAMES, PlanSpec
from lightning_paci.simulate import CostModel, replay, simulate_schedule
from lightning_paci.timeline import TimelineEvent, plot_gantt, write_chrome_trace
from recipes.benchmark_config import Config

PEERS = {"peer_gpipe": "gpipe", "peer_1f1b": "1f1b"}  # torch's ScheduleGPipe / Schedule1F1B: our plans' order
OURS = {STRATEGY_NAMES[s]: s for s in ("gpipe", "1f1b", "paci")}  # Trainer(strategy=name) runs of each schedule
PIPELINES = tuple(PEERS) + tuple(OURS)
SINGLES = ("single_1thread", "single_allcores")


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per schedule: tokens/s median/min/max, per-round ratios, per-stage medians."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_name.setdefault(run["name"], []).append(run)
    rate = {(r["name"], r["round"]): r["tokens_per_s"] for r in runs}
    per_stage = {(r["name"], r["round"]): _stage_work(cfg, r["stages"]) for r in runs}
    work = {key: sum(w) for key, w in per_stage.items() if w}  # compute seconds per batch, all stages
    for run in runs:
        _add_balance_ceiling(run["stages"], per_stage[run["name"], run["round"]])
    out = {}
    for name, rs in by_name.items():
        tps = [r["tokens_per_s"] for r in rs]
        row: dict[str, Any] = {"tokens_per_s": _median(tps), "tokens_per_s_min": min(tps),
                               "tokens_per_s_max": max(tps), "spread": (max(tps) - min(tps)) / _median(tps),
                               "foreign_cpu_max": max(r.get("foreign_cpu", 0.0) for r in rs),
                               "loss_last": _median([r.get("loss_last", float("nan")) for r in rs])}
        for base in ("pipe_1f1b", "peer_1f1b"):
            ratios = [rate[name, r["round"]] / rate[base, r["round"]] for r in rs if (base, r["round"]) in rate]
            row[f"vs_{base}"] = _median(ratios)
            row[f"vs_{base}_min"], row[f"vs_{base}_max"] = (min(ratios), max(ratios)) if ratios else (None, None)
            # The same ratio at equal compute speed: the two runs' compute per batch (the same work)
            # differs only by how fast the machine ran in each, which scales all of a run's time.
            pairs = [((name, r["round"]), (base, r["round"])) for r in rs]
            pairs = [(a, b) for a, b in pairs if work.get(a) and work.get(b)]
            equal = [rate[a] * work[a] / (rate[b] * work[b]) for a, b in pairs]
            row[f"vs_{base}_equal_compute"], row[f"vs_{base}_equal_compute_per_round"] = _median(equal), equal
            row[f"compute_vs_{base}"] = _median([work[a] / work[b] for a, b in pairs])
        stages = []
        for k, first in enumerate(rs[0]["stages"]):
            stage = {"stage": first["stage"]}
            for key in first:
                if key != "stage":
                    stage[key] = _median([r["stages"][k][key] for r in rs])
            if "utilization" in first:
                stage["utilization_min"] = min(r["stages"][k]["utilization"] for r in rs)
            stages.append(stage)
        row["stages"] = stages
        out[name] = row
    return out


def _stage_work(cfg: Config, stages: list[dict[str, Any]]) -> list[float] | None:
    """Each stage's compute seconds per batch, from the run's mean action costs."""
    if not all("forward_s" in s for s in stages):
        return None
    return [cfg.micro_batches * (s["forward_s"] + s["backward_s"]) + s["step_s"] for s in stages]


def _add_balance_ceiling(stages: list[dict[str, Any]], work: list[float] | None) -> None:
    """``balance_ceiling``: a stage's compute per batch (``_stage_work``) over the busiest stage's.
    A stage cannot be busier than that: it waits for the slower one."""
    if work is None:
        return
    for s, w in zip(stages, work):
        s["balance_ceiling"] = w / max(max(work), 1e-12)


def goals(cfg: Config, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's four goals, each with its measured value and verdict."""
    n, m = cfg.stages, cfg.micro_batches
    paci, flush = summary["paci"], summary["pipe_1f1b"]
    util = min(s["utilization"] for s in paci["stages"])
    memory = max(p["run_memory_bytes"] / f["run_memory_bytes"] for p, f in zip(paci["stages"], flush["stages"]))
    rows = [("paci utilization, every stage (lowest stage, median over rounds)", util, 0.95),
            ("paci / pipe_1f1b throughput", paci["vs_pipe_1f1b"], 0.95 * (m + n - 1) / m),
            ("pipe_1f1b / peer_1f1b throughput", flush["vs_peer_1f1b"], 0.97)]
    out = [{"goal": g, "value": v, "target": f">= {t:.4g}", "met": v >= t} for g, v, t in rows]
    out.append({"goal": "paci / pipe_1f1b peak memory of the run, every stage (highest)", "value": memory,
                "target": "<= 1.02", "met": memory <= 1.02})
    return out


def time_budget(events: list[TimelineEvent], batch_starts: set[str],
                window: tuple[float, float]) -> dict[str, float]:
    """Where one stage's time in ``window`` went, as fractions summing to 1.

    ``compute``: inside forward/backward/step; ``wait``: blocked on a neighbour (recv/send);
    ``between_batches``: before the first action of a batch (``batch_starts``, e.g. ``{"F4"}``),
    which is the trainer's loop (hooks, logging, the next batch) since the previous batch's last
    action; ``between_actions``: the runtime's own bookkeeping between two actions of a batch.
    """
    length = window[1] - window[0]
    budget = dict.fromkeys(("compute", "wait", "between_actions", "between_batches"), 0.0)
    cursor = window[0]
    for e in sorted(events, key=lambda e: e.start):
        if e.end <= window[0] or e.start >= window[1]:
            continue
        start, end = max(e.start, window[0]), min(e.end, window[1])
        if start > cursor:  # untimed gap before this event
            action = e.action.split(" ")[-1]  # "recv F4" waits for F4's input
            budget["between_batches" if action in batch_starts else "between_actions"] += start - cursor
        budget["wait" if e.category == "wait" else "compute"] += end - max(start, cursor)
        cursor = max(cursor, end)
    budget["between_actions"] += max(0.0, window[1] - cursor)
    return {key: value / length for key, value in budget.items()}


def timed_steps(cfg: Config) -> tuple[int, int]:
    """0-based steps whose ends bound the timed window: step w (warm-up) and step K-c (end of run)."""
    return cfg.warmup_steps - 1, cfg.steps - cfg.cooldown_steps - 1


def replay_ceiling(cfg: Config, schedule: str, timeline: list[TimelineEvent]) -> dict[str, Any]:
    """Utilization the plan allows given the run's own action times: the plan replayed with every
    action's measured duration and nothing between actions (``simulate.replay``), over the same
    timed steps (from the end of step w to that of step K-c on the last stage).

    ``utilization``: per stage, its compute over the window; what jitter and imbalance of the
    actions themselves leave. ``overhead``: 1 - replayed window / measured window, the share of the
    measured time that went to everything else on the critical path (the trainer's loop, the
    runtime's bookkeeping, message latency).
    """
    n, last = cfg.stages, cfg.stages - 1
    spec = PlanSpec(schedule, n, cfg.micro_batches, cfg.micro_batches)
    events = replay(spec.plan(cfg.steps), timeline)
    closes, count = [], 0  # index of the last stage's last action of each batch
    for k in range(cfg.steps):
        count += len(spec.batch(last, k))
        closes.append(count - 1)
    ends = [e.end for e in events if e.stage == last]
    first, last_step = timed_steps(cfg)
    window = (ends[closes[first]], ends[closes[last_step]])
    utilization = [time_budget([e for e in events if e.stage == i], set(), window)["compute"] for i in range(n)]
    return {"utilization": utilization, "length": window[1] - window[0]}


def _costs(cfg: Config, summary: dict[str, Any], names: tuple[str, ...], path: Path) -> CostModel:
    """Per-stage mean F/B/S seconds of the named runs (steady window, median over rounds), saved
    in the simulator's --costs format."""
    stages = [{key: statistics.fmean(summary[name]["stages"][k][key] for name in names)
               for key in ("forward_s", "backward_s", "step_s")} for k in range(cfg.stages)]
    path.write_text(json.dumps({"stages": stages, "transfer_s": 0.0}, indent=1) + "\n")
    return CostModel.from_json({"stages": stages})


def simulator_check(cfg: Config, summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """The simulator fed ours' measured costs, two ways.

    ``shared``: one cost per stage (mean of the pipe_1f1b and paci runs) for both schedules, the
    simulator's own model of independent devices. ``own``: each schedule timed with the costs
    measured in its own runs, which carry whatever slowdown running both stages at once causes.
    """
    m, tokens = cfg.micro_batches, cfg.batch_size * cfg.block_size / cfg.micro_batches
    measured = summary["paci"]["vs_pipe_1f1b"]
    shared = _costs(cfg, summary, ("pipe_1f1b", "paci"), out / "costs.json")
    paci, flush = simulate_schedule("paci", shared, m), simulate_schedule("1f1b", shared, m)
    own_paci = simulate_schedule("paci", _costs(cfg, summary, ("paci",), out / "costs_paci.json"), m)
    own_flush = simulate_schedule("1f1b", _costs(cfg, summary, ("pipe_1f1b",), out / "costs_pipe_1f1b.json"), m)
    out_rows = {}
    for label, (p, f) in (("shared", (paci, flush)), ("own", (own_paci, own_flush))):
        ratio = p.rate() / f.rate()
        out_rows[label] = {"predicted_paci_vs_pipe_1f1b": ratio, "relative_error": ratio / measured - 1.0,
                           "predicted_tokens_per_s": {"paci": p.rate() * tokens, "pipe_1f1b": f.rate() * tokens},
                           "predicted_utilization_paci": [st.steady_utilization for st in p.stages]}
    return {"costs": str(out / "costs.json"), "measured_paci_vs_pipe_1f1b": measured, **out_rows,
            "_results": (paci, flush)}


def _steady_slice(events: list[TimelineEvent], n: int, m: int, k0: int, k1: int) -> list[TimelineEvent]:
    """Batches k0..k1-1: from the end of the last stage's B(k0*m - 1) to that of B(k1*m - 1), from 0."""
    ends = {e.action: e.end for e in events if e.stage == n - 1 and e.category == "backward"}
    t0, t1 = ends[f"B{k0 * m - 1}"], ends[f"B{k1 * m - 1}"]
    return [e._replace(start=max(e.start, t0) - t0, end=min(e.end, t1) - t0) for e in events
            if e.end > t0 and e.start < t1]


def draw(cfg: Config, timelines: dict[str, list[TimelineEvent]], sim: tuple, out: Path) -> dict[str, str]:
    n, m, k0 = cfg.stages, cfg.micro_batches, cfg.warmup_steps
    paci, flush = sim
    panels = {f"measured {name}": _steady_slice(timelines[name], n, m, k0, k0 + 2)
              for name in ("paci", "pipe_1f1b", "peer_1f1b") if name in timelines}
    for label, result in (("simulated paci", paci), ("simulated pipe_1f1b", flush)):
        panels[f"{label} (measured costs)"] = _steady_slice(list(result.events), n, m, 2, 4)
    gantt = plot_gantt(panels, out / "gantt.png")
    trace = write_chrome_trace({**{f"measured {k}": v for k, v in timelines.items()},
                                "simulated paci": paci.events, "simulated pipe_1f1b": flush.events},
                               out / "trace.json")
    return {"gantt": str(gantt), "trace": str(trace)}


def _machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": os.getloadavg(),
            "python": platform.python_version(), "torch": torch.__version__, "lightning": L.__version__,
            "backend": "gloo", "platform": platform.platform()}


def table(cfg: Config, summary: dict[str, Any]) -> str:
    """The Markdown table of BENCHMARKS.md."""
    head = ("| run | tokens/s median [min, max] | vs pipe_1f1b | vs peer_1f1b | utilization per stage | "
            "bubble per stage | peak MiB per stage: run (heap) | max drift | last loss |")
    lines = [head, "|" + "---|" * 9]
    for name in PIPELINES + SINGLES:
        if name not in summary:
            continue
        row, stages = summary[name], summary[name]["stages"]

        def col(key: str, fmt: str) -> str:
            return " / ".join(fmt.format(s[key]) for s in stages) if key in stages[0] else "-"

        mib = " / ".join(f"{s['run_memory_bytes'] / 2**20:.1f} ({s['peak_memory_bytes'] / 2**20:.0f})"
                         for s in stages)
        lines.append(f"| {name} | {row['tokens_per_s']:.0f} [{row['tokens_per_s_min']:.0f}, "
                     f"{row['tokens_per_s_max']:.0f}] | {row['vs_pipe_1f1b']:.3f} | {row['vs_peer_1f1b']:.3f} | "
                     f"{col('utilization', '{:.3f}')} | {col('bubble_fraction', '{:.3f}')} | {mib} | "
                     f"{col('max_drift', '{:.0f}')} | {row['loss_last']:.4f} |")
    return "\n".join(lines)


def print_findings(cfg: Config, summary: dict[str, Any], verdicts: list[dict[str, Any]]) -> None:
    """The table, the goals' verdicts, the ratios at equal compute speed and where PACI's and
    pipe_1f1b's time went."""
    print("\n" + table(cfg, summary) + "\n")
    for g in verdicts:
        print(f"{'MET   ' if g['met'] else 'MISSED'} {g['goal']}: {g['value']:.4f} (target {g['target']})")
    for name, base in (("paci", "pipe_1f1b"), ("pipe_1f1b", "peer_1f1b")):
        row = summary[name]
        rounds_ = ", ".join(f"{v:.3f}" for v in row[f"vs_{base}_equal_compute_per_round"])
        print(f"at equal compute speed: {name} / {base} {row[f'vs_{base}_equal_compute']:.4f} (per round "
              f"{rounds_}); compute per batch, {name} / {base}: {row[f'compute_vs_{base}']:.3f}")
    for name in ("paci", "pipe_1f1b"):
        for st in summary[name]["stages"]:
            if "wait_fraction" in st:
                jitter = (f"; forward/backward times vary by {100 * st['forward_cv']:.0f}%/"
                          f"{100 * st['backward_cv']:.0f}% (CV)" if "forward_cv" in st else "")
                print(f"{name} stage {st['stage']} time: compute {st['compute_fraction']:.3f}, waiting for a "
                      f"neighbour {st['wait_fraction']:.3f}, runtime between actions "
                      f"{st['between_actions_fraction']:.3f}, trainer loop between batches "
                      f"{st['between_batches_fraction']:.3f}; balance ceiling {st['balance_ceiling']:.3f}, "
                      f"replay ceiling {st['replay_utilization']:.3f}{jitter}")


def report(cfg: Config, model: dict[str, Any], runs: list[dict[str, Any]], timelines: dict[str, Any],
           rounds: list[dict[str, float]]) -> None:
    """Summarize, print the table and verdicts, write benchmark.json, costs, Gantt chart and trace."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    concurrency = {key: _median([c[key] for c in rounds]) for key in rounds[0]}
    concurrency["parallel_speedup_per_round"] = [c["parallel_speedup"] for c in rounds]
    concurrency["rank_spread_per_round"] = [c["rank_spread"] for c in rounds]
    summary = summarize(cfg, runs)
    sim = simulator_check(cfg, summary, out)
    artifacts = draw(cfg, timelines, sim.pop("_results"), out)
    result = {
        "command": " ".join(["python", "recipes/benchmark.py", *sys.argv[1:]]),
        "config": dataclasses.asdict(cfg), "machine": {**_machine(), "concurrency": concurrency},
        "model": model,
        "tokens_per_step": cfg.batch_size * cfg.block_size,
        "ideal_paci_vs_pipe_1f1b": (cfg.micro_batches + cfg.stages - 1) / cfg.micro_batches,
        "summary": summary, "goals": goals(cfg, summary), "simulator": sim, "artifacts": artifacts, "runs": runs,
    }
    path = out / "benchmark.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print_findings(cfg, summary, result["goals"])
    for label in ("shared", "own"):
        row = sim[label]
        print(f"simulator ({label} costs): paci / pipe_1f1b predicted {row['predicted_paci_vs_pipe_1f1b']:.4f}, "
              f"measured {sim['measured_paci_vs_pipe_1f1b']:.4f} ({100 * row['relative_error']:+.1f}%)")
    overhead = ", ".join(f"{name} {summary[name]['stages'][0]['overhead_fraction']:.3f}" for name in PIPELINES
                         if name in summary)
    print(f"share of the timed window the plan's replay does not need (runtime, trainer, messages): {overhead}")
    speedups = ", ".join(f"{v:.2f}" for v in concurrency["parallel_speedup_per_round"])
    print(f"machine: {cfg.stages} single-thread processes at once run {concurrency['slowdown']:.2f}x slower each "
          f"than alone (median; parallel speedup per round {speedups} of {cfg.stages}); the same micro-batch "
          f"forward+backward, repeated, varies by {100 * concurrency['alone_cv']:.1f}% alone and "
          f"{100 * concurrency['together_cv']:.1f}% with all stages busy (coefficient of variation)")
    spreads = ", ".join(f"{100 * v:.1f}%" for v in concurrency["rank_spread_per_round"])
    spread = 100 * concurrency["rank_spread"]
    print(f"machine: running that same work at once, the slowest process took {spread:.1f}% longer than"
          f" the fastest (median; per round {spreads}): cores of unequal speed, so a stage on the "
          "faster one waits for the other")
    noisy = [f"{r['name']}#{r['round']}" for r in runs if r["foreign_cpu"] > 0.05]
    if noisy:
        print(f"WARNING: other processes used more than 5% of the CPU during {', '.join(noisy)}: rerun when quiet")
    print(f"wrote {path}, {artifacts['gantt']}, {artifacts['trace']}")


def main(argv: list[str] | None = None) -> None:
    """Summarize a stored run again: ``python -m recipes.benchmark_report runs/benchmark/benchmark.json``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m recipes.benchmark_report", description=main.__doc__)
    parser.add_argument("result", type=Path, help="a benchmark.json written by recipes/benchmark.py")
    stored = json.loads(parser.parse_args(argv).result.read_text())
    names = {f.name for f in dataclasses.fields(Config)}
    cfg = Config(**{k: v for k, v in stored["config"].items() if k in names})
    summary = summarize(cfg, stored["runs"])
    print(f"{stored['command']}  ({stored['machine']['cpu']}, {stored['machine']['cores']} cores)")
    print_findings(cfg, summary, goals(cfg, summary))


if __name__ == "__main__":
    main()
