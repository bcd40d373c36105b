"""Time to accuracy without the machine's noise: tokens to a target from the replayed validation
curves, times PACI's throughput ratio over flush at the same m.

    python recipes/replay_tta.py runs/gap --lr 2e-3 --ratio 4:1.202 --out docs/tta-replay

The curves come from recipes/staleness_sweep.py (one JSON per run). A replay's curve is the run's
curve (recipes/replay_gpt.py), so it does not depend on how fast the machine ran it. For each m,
the target is the worst final perplexity among that PACI configuration's seeds and the flush seeds
(so every run reaches it); tokens to it are read off each curve, interpolated in log perplexity
between validations. Flush needs the same tokens at every m (the same updates), so

    speed-up over flush at m = (flush tokens / PACI tokens) x (PACI tokens/s / flush tokens/s at m).

``--ratio m:r`` gives the throughput ratio measured side by side at m (recipes/benchmark.py);
where none is given the bubble model (m+N-1)/m times ``--efficiency`` stands in, marked as such.
``--tokens-per-s m:paci:flush`` adds each schedule's tokens/s at m, for the paper's metric: PACI's
speed-up over the fastest flush configuration (flush at whichever m runs fastest).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def tokens_to(curve: list[dict], target: float, tokens_per_step: int) -> float | None:
    """Tokens at which the curve first reaches ``target`` (interpolated in log ppl); None if never.
    A target met at the first validation is taken there, an upper bound (the curves have no point
    before it); the targets used here are met near the end of the runs."""
    prev = None
    for point in curve:
        if point["ppl"] <= target:
            if prev is None:
                return point["step"] * tokens_per_step
            drop = math.log(prev["ppl"]) - math.log(point["ppl"])
            frac = (math.log(prev["ppl"]) - math.log(target)) / drop
            return (prev["step"] + frac * (point["step"] - prev["step"])) * tokens_per_step
        prev = point
    return None


def load(sweep: Path, schedule: str, lr: float, m: int | None, steps: int) -> list[dict]:
    pattern = f"{schedule}-n{steps}-lr{lr:g}" + (f"-m{m}" if m else "") + "-s*.json"
    return [json.loads(p.read_text()) for p in sorted(sweep.glob(pattern))]


def band(values: list[float], spec: str) -> str:
    return f"{statistics.median(values):{spec}} [{min(values):{spec}}, {max(values):{spec}}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--micro-batches", default="4,8,16")
    parser.add_argument("--tokens-per-step", type=int, default=16 * 128, help="batch x context of the runs")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--ratio", action="append", default=[],
                        help="m:r, PACI/1F1B-flush tokens/s measured side by side at m (repeatable)")
    parser.add_argument("--tokens-per-s", action="append", default=[],
                        help="m:paci:flush, both schedules' tokens/s at m (benchmark medians, repeatable): "
                             "gives the speed-up over the fastest flush configuration")
    parser.add_argument("--efficiency", type=float, default=1.202 / 1.25,
                        help="measured share of the bubble model's ratio, for m without --ratio "
                             "(default: BENCHMARKS.md's m=4 run, 1.202 of the ideal 1.25)")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    measured = {int(k): float(v) for k, v in (r.split(":") for r in args.ratio)}
    tps = {int(m): (float(p), float(f)) for m, p, f in (t.split(":") for t in args.tokens_per_s)}
    fastest_flush = max((f, m) for m, (_, f) in tps.items()) if tps else None
    flush = load(args.sweep, "flush", args.lr, None, args.steps)
    if not flush:
        parser.error(f"no flush runs at lr {args.lr:g} and {args.steps} steps in {args.sweep}")
    rows = []
    for m in (int(v) for v in args.micro_batches.split(",")):
        paci = load(args.sweep, "paci", args.lr, m, args.steps)
        if not paci:
            continue
        target = max(r["final_ppl"] for r in paci + flush)
        f_tok = [tokens_to(r["curve"], target, args.tokens_per_step) for r in flush]
        p_tok = [tokens_to(r["curve"], target, args.tokens_per_step) for r in paci]
        token_ratio = statistics.median(f_tok) / statistics.median(p_tok)
        ratio = measured.get(m, (m + args.stages - 1) / m * args.efficiency)
        rows.append({"m": m, "target": target, "flush_tokens": f_tok, "paci_tokens": p_tok,
                     "token_ratio": token_ratio, "throughput_ratio": ratio, "measured": m in measured,
                     "speedup": token_ratio * ratio,
                     "speedup_per_seed": [statistics.median(f_tok) / t * ratio for t in p_tok],
                     # flush needs the same tokens at every m: compare with its fastest m's tokens/s
                     "vs_fastest_flush": (token_ratio * tps[m][0] / fastest_flush[0]
                                          if fastest_flush and m in tps else None)})
    lines = ["| m | target ppl | flush tokens to target (M) | PACI tokens to target (M) "
             "| tokens ratio flush/PACI | PACI/flush tokens/s | speed-up over flush at the same m: "
             "median [min, max] over PACI seeds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        source = "measured" if r["measured"] else "bubble model x efficiency"
        lines.append(f"| {r['m']} | {r['target']:.3f} | {band([t / 1e6 for t in r['flush_tokens']], '.3f')} "
                     f"| {band([t / 1e6 for t in r['paci_tokens']], '.3f')} | {r['token_ratio']:.3f} "
                     f"| {r['throughput_ratio']:.3f} ({source}) | {band(r['speedup_per_seed'], '.3f')} |")
    text = "\n".join(lines) + "\n"
    if fastest_flush:
        best, best_m = fastest_flush
        text += f"\nAgainst the fastest flush configuration (m={best_m}, {best:.0f} tokens/s): "
        text += ", ".join(f"PACI m={r['m']} {r['vs_fastest_flush']:.2f}x" for r in rows
                          if r["vs_fastest_flush"] is not None) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
