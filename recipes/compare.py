"""Compare the runs of a sweep as the paper does: validation perplexity over wall-clock time.

    python recipes/compare.py runs/<sweep>                   # -> runs/<sweep>/compare.png, compare.md
    python recipes/compare.py runs/<sweep> --target-ppl 9.5  # time to a perplexity of your choice
    python recipes/compare.py runs/<sweep> --out docs/sweep  # -> docs/sweep.png, docs/sweep.md

Every subfolder of the sweep with TensorBoard event files is a run; the events are read with
TensorBoard's own reader. The figure plots validation perplexity against training seconds and
against tokens, one line per run. The table gives per run: the final validation perplexity, the
training time to reach the target perplexity (default: the worst final perplexity among the runs,
so every run reaches it), the speed-up against the fastest flush run (1F1B-flush or GPipe) to that
target, the tokens/s, the peak memory of the largest stage and the maximal version drift.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

FLUSH = ("1f1b", "gpipe")
ORDER = {"paci": 0, "1f1b": 1, "gpipe": 2}


@dataclass
class Run:
    """What compare.py needs of one run; the lists are aligned by validation."""

    name: str
    schedule: str  # paci | 1f1b | gpipe | single
    steps: list[int]
    ppl: list[float]
    elapsed_s: list[float]
    tokens: list[float]
    tokens_per_s: float | None
    peak_memory_bytes: float | None
    max_drift: float | None

    @property
    def final_ppl(self) -> float:
        return self.ppl[-1]

    def time_to(self, target: float) -> float | None:
        """Training seconds at the first validation at or below ``target``; None if never."""
        return next((t for t, p in zip(self.elapsed_s, self.ppl) if p <= target), None)


def _schedule(run_dir: Path) -> str:
    config = run_dir / ".hydra" / "config.yaml"
    if config.exists():
        strategy = OmegaConf.load(config).get("strategy")
        return str(strategy.schedule) if OmegaConf.is_dict(strategy) and "schedule" in strategy else "single"
    return next((s for s in ORDER if run_dir.name.startswith(s)), "single")


def load_run(run_dir: Path) -> Run:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    missing = {"val/ppl", "val/elapsed_s", "val/tokens_seen"} - tags
    if missing:
        raise ValueError(f"{run_dir} has no {sorted(missing)} scalars: not a run of recipes/pretrain_gpt.py, "
                         "or it stopped before its first validation")

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in events.Scalars(tag)}

    ppl, elapsed, tokens = series("val/ppl"), series("val/elapsed_s"), series("val/tokens_seen")
    steps = sorted(ppl)

    def last(tag: str) -> float | None:
        return events.Scalars(tag)[-1].value if tag in tags else None

    def over_stages(key: str) -> float | None:
        values = [last(t) for t in tags if t.startswith("pipeline/stage") and t.endswith("/" + key)]
        return max(values) if values else None

    return Run(
        name=run_dir.name,
        schedule=_schedule(run_dir),
        steps=steps,
        ppl=[ppl[s] for s in steps],
        elapsed_s=[elapsed[s] for s in steps],
        tokens=[tokens[s] for s in steps],
        tokens_per_s=last("perf/tokens_per_s"),
        peak_memory_bytes=over_stages("peak_memory_bytes"),
        max_drift=over_stages("max_drift"),
    )


def find_runs(sweep: Path) -> list[Run]:
    """Every folder under ``sweep`` (or ``sweep`` itself) that holds event files, in schedule order."""
    folders = sorted({p.parent for p in sweep.rglob("events.out.tfevents.*")})
    if not folders:
        raise FileNotFoundError(f"no TensorBoard event files under {sweep}")
    runs = [load_run(f) for f in folders]
    return sorted(runs, key=lambda r: (ORDER.get(r.schedule, 3), r.name))


def summarize(runs: list[Run], target: float | None = None) -> tuple[float, list[dict]]:
    """(target perplexity, one row of numbers per run), the content of the table."""
    target = max(r.final_ppl for r in runs) if target is None else target
    flush_times = [t for r in runs if r.schedule in FLUSH and (t := r.time_to(target)) is not None]
    fastest_flush = min(flush_times, default=None)
    rows = []
    for r in runs:
        t = r.time_to(target)
        rows.append({
            "run": r.name,
            "schedule": r.schedule,
            "final_ppl": r.final_ppl,
            "time_to_target_s": t,
            "speedup": fastest_flush / t if fastest_flush is not None and t else None,
            "tokens_per_s": r.tokens_per_s,
            "peak_memory_mib": r.peak_memory_bytes / 2**20 if r.peak_memory_bytes is not None else None,
            "max_drift": r.max_drift,
        })
    return target, rows


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(target: float, rows: list[dict]) -> str:
    head = (f"| run | schedule | final val ppl | time to ppl {target:.3f} (s) | speed-up vs fastest flush "
            "| tokens/s | peak memory (MiB) | max drift |")
    lines = [head, "|" + "---|" * 8]
    for row in rows:
        speedup = _fmt(row["speedup"], ".2f") + ("x" if row["speedup"] else "")
        cells = [row["run"], row["schedule"], _fmt(row["final_ppl"], ".3f"), _fmt(row["time_to_target_s"], ".1f"),
                 speedup, _fmt(row["tokens_per_s"], ".0f"), _fmt(row["peak_memory_mib"], ".1f"),
                 _fmt(row["max_drift"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = {"paci": "tab:blue", "1f1b": "tab:orange", "gpipe": "tab:green"}
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    for r in runs:  # one colour per schedule, one line style per run of that schedule
        k = seen[r.schedule] = seen.get(r.schedule, -1) + 1
        style = {"color": colors.get(r.schedule, "tab:grey"), "linestyle": styles[k % len(styles)],
                 "marker": "o", "markersize": 3, "label": r.name}
        by_time.plot(r.elapsed_s, r.ppl, **style)
        by_tokens.plot([t / 1e6 for t in r.tokens], r.ppl, **style)
    for ax, xlabel in ((by_time, "training wall-clock (s)"), (by_tokens, "tokens (millions)")):
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":", label=f"target {target:.3f}")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)))
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    by_time.set_ylabel("validation perplexity")
    by_time.set_title("validation perplexity vs wall-clock")
    by_tokens.set_title("validation perplexity vs tokens")
    by_tokens.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="folder of a sweep, e.g. runs/2026-01-01_12-00-00")
    parser.add_argument("--target-ppl", type=float, default=None,
                        help="perplexity for the time-to-target column (default: the worst final one)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output path without suffix (default: <sweep>/compare) -> .png and .md")
    args = parser.parse_args(argv)
    runs = find_runs(args.sweep)
    target, rows = summarize(runs, args.target_ppl)
    out = args.out or args.sweep / "compare"
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(target, rows)
    out.with_suffix(".md").write_text(table)
    plot(runs, target, out.with_suffix(".png"))
    print(table + f"\nwrote {out.with_suffix('.png')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
