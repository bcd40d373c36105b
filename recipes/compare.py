"""Compare the runs of a sweep as the paper does: validation perplexity over wall-clock time.

    python recipes/compare.py runs/<sweep>                   # -> runs/<sweep>/compare.png, compare.md
    python recipes/compare.py runs/<sweep> --target-ppl 9.5  # time to a perplexity of your choice
    python recipes/compare.py runs/<sweep> --out docs/sweep  # -> docs/sweep.png, docs/sweep.md

Every subfolder of the sweep with TensorBoard event files is a run; the events are read with
TensorBoard's own reader. Runs named ``<configuration>-s<seed>`` are seeds of one configuration.

The table gives per run: the final validation perplexity, the training time to reach the target
perplexity (default: the worst final perplexity among the runs that validated), the speed-up
against the fastest flush configuration (1F1B-flush or GPipe; with seeds, the one with the lowest
median time) to that target, the tokens/s (training tokens / training seconds at the last
validation: the whole run's average), the peak memory of the largest stage and the maximal
version drift. With seeds, a second table gives each configuration's median [min, max].

Time to target is read off the validation curve: the curve is interpolated linearly in log
perplexity between the last validation above the target and the first one at or below it. A run
that is already at or below the target at its first validation only says "at most this long", so
no speed-up is computed from it; neither for a run that never validated, nor for one that never
reached the target. The table says which of these happened instead of printing a number.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

FLUSH = ("1f1b", "gpipe")
ORDER = {"paci": 0, "1f1b": 1, "gpipe": 2}
# Settings read from each run's .hydra/config.yaml: the figure's title shows those all runs share.
SETUP_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.lr",
              "data.batch_size", "data._target_", "trainer.max_steps", "trainer.devices", "strategy.schedule",
              "strategy.micro_batches", "seed")
SEED_SUFFIX = re.compile(r"^(?P<config>.+)-s(?P<seed>\d+)$")
NEVER_VALIDATED = "never validated"
NOT_REACHED = "not reached"
AT_FIRST = "at 1st validation"  # the curve was already below the target: only an upper bound


@dataclass
class Run:
    """What compare.py needs of one run; the lists are aligned by validation."""

    name: str
    schedule: str  # paci | 1f1b | gpipe | single
    steps: list[int]
    ppl: list[float]
    elapsed_s: list[float]
    tokens: list[float]
    tokens_per_s: float | None = None
    peak_memory_bytes: float | None = None
    max_drift: float | None = None
    unigram_ppl: float | None = None
    config: dict = field(default_factory=dict)  # SETUP_KEYS of the run's Hydra config, if it has one

    @property
    def validated(self) -> bool:
        return bool(self.ppl)

    @property
    def final_ppl(self) -> float:
        return self.ppl[-1] if self.ppl else math.nan

    @property
    def configuration(self) -> str:
        """The name without its seed: the runs of one configuration share it."""
        match = SEED_SUFFIX.match(self.name)
        return match["config"] if match else self.name

    def crossing(self, target: float, xs: list[float] | None = None) -> tuple[float | None, str | None]:
        """(x where the validation curve first reaches ``target``, None) or (None or an upper bound,
        why no exact value). ``xs``: the x axis, training seconds by default (tokens also work)."""
        xs = self.elapsed_s if xs is None else xs
        if not self.validated:
            return None, NEVER_VALIDATED
        for i, p in enumerate(self.ppl):
            if not (math.isfinite(p) and p <= target):
                continue
            before = self.ppl[i - 1] if i else math.nan
            if not (math.isfinite(before) and before > target):
                return xs[i], AT_FIRST  # nothing above the target to interpolate from
            frac = (math.log(before) - math.log(target)) / (math.log(before) - math.log(p))
            return xs[i - 1] + frac * (xs[i] - xs[i - 1]), None
        return None, NOT_REACHED

    def time_to(self, target: float) -> float | None:
        """Training seconds at which the curve reaches ``target``; None unless exactly known."""
        t, why = self.crossing(target)
        return t if why is None else None


def _setup(run_dir: Path) -> dict:
    """SETUP_KEYS of the run's composed config ({} without one); each key is resolved on its own, as
    the whole file holds interpolations (``${now:...}``) that only Hydra can resolve."""
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.exists():
        return {}
    config = OmegaConf.load(config_file)
    out = {}
    for key in SETUP_KEYS:
        try:
            value = OmegaConf.select(config, key, throw_on_missing=False)
        except Exception:  # an interpolation this process cannot resolve: leave the key out
            continue
        if value is not None and not OmegaConf.is_config(value):
            out[key] = value
    return out


def _schedule(run_dir: Path, config: dict) -> str:
    if "strategy.schedule" in config:
        return str(config["strategy.schedule"])
    if config:  # a run of the recipe without a pipeline strategy (strategy=single)
        return "single"
    return next((s for s in ORDER if run_dir.name.startswith(s)), "single")


def _scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in events.Scalars(tag)}


def load_run(run_dir: Path) -> Run:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    config = _setup(run_dir)

    def last(tag: str) -> float | None:
        return events.Scalars(tag)[-1].value if tag in tags else None

    def over_stages(key: str) -> float | None:
        values = [last(t) for t in tags if t.startswith("pipeline/stage") and t.endswith("/" + key)]
        return max(values) if values else None

    ppl, elapsed, tokens = ({}, {}, {})
    if {"val/ppl", "val/elapsed_s", "val/tokens_seen"} <= tags:  # else: it stopped before validating
        ppl, elapsed, tokens = (_scalars(events, t) for t in ("val/ppl", "val/elapsed_s", "val/tokens_seen"))
    steps = sorted(ppl)
    return Run(
        name=run_dir.name,
        schedule=_schedule(run_dir, config),
        steps=steps,
        ppl=[ppl[s] for s in steps],
        elapsed_s=[elapsed[s] for s in steps],
        tokens=[tokens[s] for s in steps],
        tokens_per_s=tokens[steps[-1]] / elapsed[steps[-1]] if steps and elapsed[steps[-1]] > 0 else None,
        peak_memory_bytes=over_stages("peak_memory_bytes"),
        max_drift=over_stages("max_drift"),
        unigram_ppl=last("val/unigram_ppl"),
        config=config,
    )


def find_runs(sweep: Path) -> list[Run]:
    """Every folder under ``sweep`` (or ``sweep`` itself) that holds event files, in schedule order."""
    folders = sorted({p.parent for p in sweep.rglob("events.out.tfevents.*")})
    if not folders:
        raise FileNotFoundError(f"no TensorBoard event files under {sweep}")
    runs = [load_run(f) for f in folders]
    return sorted(runs, key=lambda r: (ORDER.get(r.schedule, 3), r.name))


def default_target(runs: list[Run]) -> float:
    """The worst finite final perplexity: every run that validated without diverging reaches it."""
    finals = [r.final_ppl for r in runs if math.isfinite(r.final_ppl)]
    if not finals:
        raise ValueError("no run has a finite validation perplexity: every run stopped before its first "
                         "validation (set trainer.val_check_interval <= trainer.max_steps) or diverged")
    return max(finals)


def _by_configuration(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.configuration, []).append(r)
    return groups


def fastest_flush(runs: list[Run], target: float) -> tuple[str | None, float | None]:
    """(configuration, median time to ``target``) of the fastest flush configuration whose every
    seed reached the target after its first validation; (None, None) if there is none."""
    best: tuple[str | None, float | None] = (None, None)
    for config, group in _by_configuration(runs).items():
        times = [r.time_to(target) for r in group if r.schedule in FLUSH]
        if times and all(t is not None for t in times) and len(times) == len(group):
            median = statistics.median(times)
            if best[1] is None or median < best[1]:
                best = (config, median)
    return best


def summarize(runs: list[Run], target: float | None = None) -> tuple[float, list[dict]]:
    """(target perplexity, one row of numbers per run), the content of the table. ``why`` says why
    a time or a speed-up is missing (or only an upper bound)."""
    target = default_target(runs) if target is None else target
    reference, flush_time = fastest_flush(runs, target)
    rows = []
    for r in runs:
        t, why = r.crossing(target)
        speedup = flush_time / t if why is None and flush_time is not None else None
        rows.append({
            "run": r.name,
            "configuration": r.configuration,
            "schedule": r.schedule,
            "final_ppl": r.final_ppl,
            "time_to_target_s": t,
            "why": why,
            "speedup": speedup,
            "speedup_why": why or (None if flush_time is not None else "no flush reference"),
            "reference": reference,
            "tokens_per_s": r.tokens_per_s,
            "peak_memory_mib": r.peak_memory_bytes / 2**20 if r.peak_memory_bytes is not None else None,
            "max_drift": r.max_drift,
        })
    return target, rows


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _time_cell(row: dict) -> str:
    if row["why"] == AT_FIRST:
        return f"<= {row['time_to_target_s']:.1f} ({AT_FIRST})"
    return row["why"] or _fmt(row["time_to_target_s"], ".1f")


def _speedup_cell(row: dict) -> str:
    return f"{row['speedup']:.2f}x" if row["speedup"] is not None else f"– ({row['speedup_why']})"


def _band(values: list[float], spec: str, suffix: str = "") -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:{spec}}{suffix}"
    return f"{med:{spec}}{suffix} [{min(values):{spec}}, {max(values):{spec}}]"


def markdown(target: float, rows: list[dict]) -> str:
    head = (f"| run | schedule | final val ppl | time to ppl {target:.3f} (s) | speed-up vs fastest flush "
            "| tokens/s | peak memory (MiB) | max drift |")
    lines = [head, "|" + "---|" * 8]
    for row in rows:
        cells = [row["run"], row["schedule"], _fmt(row["final_ppl"], ".3f"), _time_cell(row),
                 _speedup_cell(row), _fmt(row["tokens_per_s"], ".0f"), _fmt(row["peak_memory_mib"], ".1f"),
                 _fmt(row["max_drift"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    reference = rows[0]["reference"] if rows else None
    out += (f"\nSpeed-ups are against {reference}, the fastest flush configuration to the target.\n" if reference
            else "\nNo speed-up: no flush configuration reached the target after its first validation.\n")
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["configuration"], []).append(row)
    if any(len(g) > 1 for g in groups.values()):
        out += ("\n| configuration | seeds | final val ppl median [min, max] | time to target (s) "
                "| speed-up vs fastest flush |\n|---|---|---|---|---|\n")
        for config, group in groups.items():
            finals = [r["final_ppl"] for r in group if math.isfinite(r["final_ppl"])]
            times = [r["time_to_target_s"] for r in group if r["why"] is None]
            speedups = [r["speedup"] for r in group if r["speedup"] is not None]
            # A band over only some seeds would hide the others: give it only when every seed has one.
            time_cell = _band(times, ".1f") if len(times) == len(group) else "– (not every seed)"
            speed_cell = _band(speedups, ".2f", "x") if len(speedups) == len(group) else "– (not every seed)"
            out += f"| {config} | {len(group)} | {_band(finals, '.3f')} | {time_cell} | {speed_cell} |\n"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="folder of a sweep, e.g. runs/2026-01-01_12-00-00")
    parser.add_argument("--target-ppl", type=float, default=None,
                        help="perplexity for the time-to-target column (default: the worst final one)")
    parser.add_argument("--unigram-ppl", type=float, default=None,
                        help="baseline line of the figure (default: the runs' logged val/unigram_ppl)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output path without suffix (default: <sweep>/compare) -> .png and .md")
    args = parser.parse_args(argv)
    runs = find_runs(args.sweep)
    try:
        target, rows = summarize(runs, args.target_ppl)
    except ValueError as err:
        parser.error(f"{args.sweep}: {err}")
    out = args.out or args.sweep / "compare"
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(target, rows)
    out.with_suffix(".md").write_text(table)
    from recipes.compare_plot import plot  # matplotlib only when a figure is drawn

    plot(runs, target, out.with_suffix(".png"), unigram=args.unigram_ppl)
    print(table + f"\nwrote {out.with_suffix('.png')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a script: make `recipes` importable from the repo root
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
