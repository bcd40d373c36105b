"""The figure of recipes/compare.py: validation perplexity against training time and against tokens.

One colour per schedule, one line style per configuration; a configuration run with several seeds
is drawn as its median with a band from the lowest to the highest seed. The grey dashed line is the
unigram perplexity of the validation split (the level of a model that ignores context), the dotted
one the target of the time-to-target column. The title states the setup every run shares.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

Run = Any  # a recipes.compare.Run (not imported: compare imports this module to draw)

COLORS = {"paci": "tab:blue", "1f1b": "tab:orange", "gpipe": "tab:green"}
STYLES = ("-", "--", ":", "-.")


def setup_title(runs: list[Run]) -> str:
    """The settings all runs share, in words; the ones that differ are named as varying."""
    def shared(key: str):
        values = {r.config.get(key) for r in runs}
        return values.pop() if len(values) == 1 else None

    if not any(r.config for r in runs):
        return "validation perplexity (setup unknown: no .hydra/config.yaml in the runs)"
    parts = []
    layers, width, heads = shared("model.n_layer"), shared("model.n_embd"), shared("model.n_head")
    if layers and width:
        parts.append(f"GPT {layers} layers x {width} wide" + (f", {heads} heads" if heads else ""))
    lr = shared("model.lr")
    parts.append(f"peak lr {float(lr):g}" if lr is not None else "lr varies")
    steps, batch, block = shared("trainer.max_steps"), shared("data.batch_size"), shared("model.block_size")
    if steps and batch and block:
        parts.append(f"{steps} steps of {batch} x {block} tokens")
    stages, corpus = shared("trainer.devices"), shared("data._target_")
    if stages:
        parts.append(f"{stages} stages")
    if corpus:
        parts.append(str(corpus).rsplit(".", 1)[-1])
    seeds = {r.config.get("seed") for r in runs} - {None}
    if len(seeds) > 1:
        parts.append(f"seeds {', '.join(str(s) for s in sorted(seeds))}")
    return ", ".join(parts)


def _label(config: str, group: list[Run]) -> str:
    return config + (f" ({len(group)} seeds, band: lowest to highest)" if len(group) > 1 else "")


def _median_curve(group: list[Run], axis: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """x (median over seeds), median, lowest and highest perplexity at each validation all seeds have."""
    steps = sorted(set.intersection(*(set(r.steps) for r in group)))
    xs, med, lo, hi = [], [], [], []
    for s in steps:
        at = [r.steps.index(s) for r in group]
        ppl = [r.ppl[i] for r, i in zip(group, at)]
        if not all(math.isfinite(p) for p in ppl):
            continue
        xs.append(statistics.median(getattr(r, axis)[i] for r, i in zip(group, at)))
        med.append(statistics.median(ppl))
        lo.append(min(ppl))
        hi.append(max(ppl))
    return xs, med, lo, hi


def plot(runs: list[Run], target: float, path: Path, unigram: float | None = None) -> list[str]:
    """Draw the figure into ``path``; returns the legend's labels."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.validated:
            groups.setdefault(r.configuration, []).append(r)
    unigram = unigram if unigram is not None else next((r.unigram_ppl for r in runs if r.unigram_ppl), None)
    fig, (by_time, by_tokens) = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
    seen: dict[str, int] = {}
    for config, group in groups.items():  # one colour per schedule, one line style per configuration
        schedule = group[0].schedule
        k = seen[schedule] = seen.get(schedule, -1) + 1
        style = {"color": COLORS.get(schedule, "tab:grey"), "linestyle": STYLES[k % len(STYLES)]}
        for ax, axis, scale in ((by_time, "elapsed_s", 1.0), (by_tokens, "tokens", 1e-6)):
            xs, med, lo, hi = _median_curve(group, axis)
            xs = [x * scale for x in xs]
            ax.plot(xs, med, marker="o", markersize=3, label=_label(config, group), **style)
            if len(group) > 1:
                ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.15, linewidth=0)
    xlabels = ((by_time, "training wall-clock (s, validation excluded)"), (by_tokens, "tokens (millions)"))
    for ax, xlabel in xlabels:
        ax.axhline(target, color="grey", linewidth=0.9, linestyle=":", label=f"target {target:.3f}")
        if unigram:
            ax.axhline(unigram, color="black", linewidth=0.9, linestyle="--",
                       label=f"unigram baseline {unigram:.2f} (ignores context)")
        ax.set_xlabel(xlabel)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)))
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    by_time.set_ylabel("validation perplexity")
    by_time.set_title("against wall-clock")
    by_tokens.set_title("against tokens (deterministic)")
    fig.suptitle(setup_title(runs), fontsize=10)
    handles, labels = by_tokens.get_legend_handles_labels()
    # Below the axes, so no curve hides under it; a band is the lowest to highest seed.
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9, frameon=False)
    rows = math.ceil(len(labels) / min(4, max(1, len(labels))))
    fig.tight_layout(rect=(0, 0.05 + 0.045 * rows, 1, 0.96))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return labels
