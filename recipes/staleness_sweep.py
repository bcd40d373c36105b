"""Map PACI's perplexity gap to flush against lr/a and training length, with seeds, by replay.

    python recipes/staleness_sweep.py --out runs/gap                     # the grid below, 3 seeds
    python recipes/staleness_sweep.py --out runs/gap --shard 0/2 &      # two processes share it
    python recipes/staleness_sweep.py --out runs/gap --shard 1/2
    python recipes/staleness_sweep.py --out runs/gap --report-only       # table + figure from the runs
    python recipes/staleness_sweep.py --out runs/lr --flush-lrs 1e-3,2e-3,4e-3 --points ''  # flush's best lr

Every run is a one-process replay of the recipe (recipes/replay_gpt.py): ``flush`` once per
(steps, lr, seed), ``paci`` once per (steps, lr, m, seed), a = m. Each result is a JSON file in
``--out``, so an interrupted sweep resumes where it stopped and shards can run side by side. The
report pairs each PACI run with the flush run of the same lr, length and seed: the gap is
``ppl_paci / ppl_flush - 1`` at the end of the run, given as median [min, max] over the seeds, in
``gap.md``/``gap.json``, and as a figure ``gap.png``. The rule it prints: for lr/a and for lr/a^2,
the largest value at which every seed ended within 1% of flush, and whether that variable separates
those points from the rest (the strategy's setup warning uses lr/a^2, lightning_paci/advice.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `recipes` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# lr:m points at the recipe's size, the most informative first: lr 2e-3 is flush's best there, so its m
# decides the recipe's default; 1e-3:8 has the lr/a of 2e-3:16 at another lr (is lr/a the variable?).
# Sized to about an hour of one core (a PACI replay takes 3-4 min, a flush one 2-3 min).
DEFAULT_POINTS = "2e-3:4,2e-3:8,2e-3:16,1e-3:8"
WITHIN = 0.01  # the gap a user may call "the same as flush"


def _parse_points(text: str) -> list[tuple[float, int]]:
    points = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        lr, m = item.split(":")
        points.append((float(lr), int(m)))
    return points


def _name(schedule: str, steps: int, lr: float, m: int | None, seed: int) -> str:
    return f"{schedule}-n{steps}-lr{lr:g}" + (f"-m{m}" if m else "") + f"-s{seed}"


def jobs(points, flush_lrs, steps_list, seeds) -> list[tuple[str, int, float, int | None, int]]:
    """(schedule, steps, lr, m, seed) of every run in the order of ``points``; each lr's flush runs
    (the references of its PACI runs) come just before its first PACI run, extra flush lrs last."""
    out = []
    for steps in steps_list:
        done: set[float] = set()
        for lr, m in points:
            if lr not in done:
                done.add(lr)
                out += [("flush", steps, lr, None, seed) for seed in seeds]
            out += [("paci", steps, lr, m, seed) for seed in seeds]
        out += [("flush", steps, lr, None, seed) for lr in flush_lrs if lr not in done for seed in seeds]
    return out


def run_all(args, todo) -> None:
    from recipes.replay_gpt import replay  # torch only where runs are made

    k, n = (int(v) for v in args.shard.split("/"))
    for i, (schedule, steps, lr, m, seed) in enumerate(todo):
        path = args.out / (_name(schedule, steps, lr, m, seed) + ".json")
        if i % n != k or path.exists():
            continue
        overrides = [f"model.lr={lr}", f"trainer.max_steps={steps}", f"seed={seed}", *args.overrides]
        result = replay(schedule, m or 1, overrides)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"{path.name}: final ppl {result['final_ppl']:.3f} in {result['seconds']:.0f} s", flush=True)


def _band(values: list[float], spec: str) -> str:
    return f"{statistics.median(values):{spec}} [{min(values):{spec}}, {max(values):{spec}}]"


def report(args, todo) -> dict:
    results = {}
    for schedule, steps, lr, m, seed in todo:
        path = args.out / (_name(schedule, steps, lr, m, seed) + ".json")
        if path.exists():
            results[(schedule, steps, lr, m, seed)] = json.loads(path.read_text())
    rows = []
    flush_rows = {}
    for schedule, steps, lr, m, seed in todo:
        if schedule == "flush" and (r := results.get((schedule, steps, lr, m, seed))):
            flush_rows.setdefault((steps, lr), []).append(r["final_ppl"])
    for steps in args.steps:
        for lr, m in _parse_points(args.points):
            gaps = []
            for seed in args.seeds:
                paci = results.get(("paci", steps, lr, m, seed))
                flush = results.get(("flush", steps, lr, None, seed))
                if paci and flush:
                    gaps.append(paci["final_ppl"] / flush["final_ppl"] - 1)
            if gaps:
                rows.append({"steps": steps, "lr": lr, "m": m, "lr_over_a": lr / m, "lr_over_a2": lr / m**2,
                             "gaps": gaps, "flush_ppl": flush_rows.get((steps, lr))})
    lines = ["| steps | lr | m = a | lr/a | lr/a^2 | seeds | PACI final ppl over flush: median [min, max] "
             "| flush final ppl median [min, max] |", "|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (r["steps"], -r["lr_over_a"])):
        flush = _band(row["flush_ppl"], ".3f") if row["flush_ppl"] else "–"
        gap = _band([100 * g for g in row["gaps"]], "+.1f") + " %"
        lines.append(f"| {row['steps']} | {row['lr']:g} | {row['m']} | {row['lr_over_a']:.3g} "
                     f"| {row['lr_over_a2']:.3g} | {len(row['gaps'])} | {gap} | {flush} |")
    flush_lines = ["| steps | lr | seeds | flush final ppl median [min, max] |", "|---|---|---|---|"]
    for (steps, lr), ppls in sorted(flush_rows.items()):
        flush_lines.append(f"| {steps} | {lr:g} | {len(ppls)} | {_band(ppls, '.3f')} |")
    # Which variable separates the points where every seed ended within 1% from the others:
    # lr/a, or lr/a^2 (the stale share counting twice; lightning_paci/advice.py uses the latter).
    rules = []
    for key, label in (("lr_over_a", "lr/a"), ("lr_over_a2", "lr/a^2")):
        ok = [r[key] for r in rows if max(r["gaps"]) < WITHIN]
        bad = [r[key] for r in rows if max(r["gaps"]) >= WITHIN]
        verdict = "separates them" if ok and bad and max(ok) < min(bad) else "does not separate them"
        rules.append(f"{label}: every seed within {WITHIN:.0%} up to {max(ok):.3g}" if ok else
                     f"{label}: no point within {WITHIN:.0%}")
        rules[-1] += (f", some seed above it from {min(bad):.3g}" if bad else "") + f" ({verdict})"
    rule = "; ".join(rules)
    ok = [r["lr_over_a2"] for r in rows if max(r["gaps"]) < WITHIN]
    text = "\n".join(lines) + "\n\n" + "\n".join(flush_lines) + f"\n\nRule: {rule}.\n"
    (args.out / "gap.md").write_text(text)
    summary = {"rows": rows, "flush": {f"{s}:{lr:g}": p for (s, lr), p in flush_rows.items()}, "rule": rule,
               "largest_lr_over_a2_within": max(ok) if ok else None}
    (args.out / "gap.json").write_text(json.dumps(summary, indent=1) + "\n")
    if rows:
        _figure(rows, args.out / "gap.png", args.title)
    print(text)
    return summary


def _figure(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (steps, lr) in enumerate(sorted({(r["steps"], r["lr"]) for r in rows})):
        mine = sorted((r for r in rows if (r["steps"], r["lr"]) == (steps, lr)), key=lambda r: r["lr_over_a"])
        x = [r["lr_over_a"] for r in mine]
        med = [100 * statistics.median(r["gaps"]) for r in mine]
        lo, hi = [100 * min(r["gaps"]) for r in mine], [100 * max(r["gaps"]) for r in mine]
        color = f"C{k}"
        ms = ", ".join(f"m={r['m']}" for r in mine)
        seeds = max(len(r["gaps"]) for r in mine)
        ax.errorbar(x, med, yerr=[[m - v for m, v in zip(med, lo)], [v - m for m, v in zip(med, hi)]],
                    marker="o", capsize=4, color=color,
                    label=f"lr {lr:g}, {steps} steps ({ms}): median, bar lowest to highest of {seeds} seeds")
        if len(x) > 1:
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
    ax.axhline(100 * WITHIN, color="grey", linestyle="--", linewidth=0.9, label=f"{WITHIN:.0%}")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate / accumulation a (= micro_batches)")
    ax.set_ylabel("PACI final val ppl over flush (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs' JSON and the report")
    parser.add_argument("--points", default=DEFAULT_POINTS, help="PACI runs as lr:m pairs, comma-separated")
    parser.add_argument("--flush-lrs", default="", help="extra flush-only learning rates, comma-separated")
    parser.add_argument("--steps", default="600", help="training lengths (trainer.max_steps), comma-separated")
    parser.add_argument("--seeds", default="1337,1338,1339")
    parser.add_argument("--shard", default="0/1", help="K/N: run every N-th job starting at K")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--title", default="PACI vs flush at equal steps, one-process replay of the recipe\n"
                        "(conf/: GPT 4 x 128, 0.9M params, batch 16 x 128, AdamW, N=2 stages)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. model.n_embd=256")
    args = parser.parse_args(argv)
    args.steps = [int(s) for s in args.steps.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    flush_lrs = [float(v) for v in args.flush_lrs.split(",") if v.strip()]
    todo = jobs(_parse_points(args.points), flush_lrs, args.steps, args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run_all(args, todo)
    report(args, todo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
