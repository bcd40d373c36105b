"""Table of the stale-micro-batch remedies against flush and plain PACI, from replay results.

    python recipes/remedy_report.py --baselines runs/gap --runs runs/remedy --lr 2e-3 --m 4

The remedy runs are ``recipes/replay_gpt.py --schedule paci --remedy NAME ... --out
RUNS/paci-n600-lr0.002-m4-s<seed>-NAME.json``; the baselines are staleness_sweep.py's flush and plain
PACI runs of the same lr, m, length and seed (``flush-n600-lr0.002-s<seed>.json``,
``paci-n600-lr0.002-m4-s<seed>.json``). Every number is a final validation perplexity of a
deterministic replay; gaps are ``ppl / ppl_reference - 1``, given per seed and as median [min, max].
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def _final(path: Path) -> float:
    return float(json.loads(path.read_text())["final_ppl"])


def _band(values: list[float]) -> str:
    return f"{100 * statistics.median(values):+.1f} [{100 * min(values):+.1f}, {100 * max(values):+.1f}] %"


def report(baselines: Path, runs: Path, lr: float, m: int, steps: int) -> str:
    stem = f"paci-n{steps}-lr{lr:g}-m{m}-s"
    by_remedy: dict[str, dict[int, float]] = {}
    for path in sorted(runs.glob(f"{stem}*-*.json")):
        seed, remedy = re.fullmatch(re.escape(stem) + r"(\d+)-(\w+)\.json", path.name).groups()
        by_remedy.setdefault(remedy, {})[int(seed)] = _final(path)
    if not by_remedy:
        raise SystemExit(f"no remedy runs named {stem}<seed>-<remedy>.json in {runs}")
    lines = ["| remedy | seed | flush | plain PACI | remedy | over flush | over plain PACI |",
             "|---|---|---|---|---|---|---|"]
    for remedy, seeds in by_remedy.items():
        over_flush, over_plain = [], []
        for seed, ppl in sorted(seeds.items()):
            flush = _final(baselines / f"flush-n{steps}-lr{lr:g}-s{seed}.json")
            plain = _final(baselines / f"{stem}{seed}.json")
            over_flush.append(ppl / flush - 1)
            over_plain.append(ppl / plain - 1)
            lines.append(f"| {remedy} | {seed} | {flush:.3f} | {plain:.3f} | {ppl:.3f} | "
                         f"{100 * over_flush[-1]:+.1f}% | {100 * over_plain[-1]:+.1f}% |")
        lines.append(f"| **{remedy}** | {len(seeds)} seeds | | | | "
                     f"**{_band(over_flush)}** | **{_band(over_plain)}** |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baselines", type=Path, required=True, help="staleness_sweep.py's --out")
    parser.add_argument("--runs", type=Path, required=True, help="where the remedy runs' JSON files are")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    print(report(args.baselines, args.runs, args.lr, args.m, args.steps))


if __name__ == "__main__":
    main()
