"""The recipe end to end, as a user runs it: python recipes/pretrain_gpt.py [-m ...], then compare.py.

Tiny configuration (2 layers, width 32, context 32, a few steps) so that each run takes seconds.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

try:
    from lightning_paci import PACIStrategy  # noqa: F401
except ImportError:
    PACIStrategy = None

ROOT = Path(__file__).resolve().parents[1]
needs_strategy = pytest.mark.skipif(PACIStrategy is None, reason="lightning_paci.PACIStrategy not importable")
STEPS, BATCH, T = 6, 8, 32
TINY = [
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", f"model.block_size={T}",
    "data.max_bytes=300000", f"data.batch_size={BATCH}", "data.val_batches=2",
    f"trainer.max_steps={STEPS}", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "throughput_window=3",
]
LOGGED = ["train/loss", "train/ppl", "train/lr", "val/loss", "val/ppl", "val/elapsed_s", "val/tokens_seen",
          "train/lengths", "train/time", "train/device/items_per_sec"]  # the last three: ThroughputMonitor


def run(*args: str, timeout: float = 240) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def pretrain(tmp_path: Path, *overrides: str, sweep: str = "s") -> str:
    common = [f"run.root={tmp_path / 'runs'}", f"run.sweep={sweep}", f"data.cache_dir={tmp_path / 'cache'}"]
    return run("recipes/pretrain_gpt.py", *overrides, *common, *TINY)


def scalars(run_dir: Path) -> dict[str, list]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def check_run(run_dir: Path) -> dict[str, list]:
    logged = scalars(run_dir)
    assert set(LOGGED) <= set(logged), set(LOGGED) - set(logged)
    assert [e.step for e in logged["val/ppl"]] == [2, 5]  # after steps 3 and 6
    assert logged["train/lengths"][-1].value == STEPS * BATCH * T
    # One process or one pipeline is one data-parallel replica: no "global" rate that multiplies the
    # pipeline's tokens by its number of stages (recipes/callbacks.PipelineThroughput).
    assert "train/items_per_sec" not in logged
    lengths, times = logged["train/lengths"], logged["train/time"]
    window = (lengths[-1].value - lengths[-3].value) / (times[-1].value - times[-3].value)
    assert logged["train/device/items_per_sec"][-1].value == pytest.approx(window, rel=1e-4)
    assert logged["val/tokens_seen"][-1].value == STEPS * BATCH * T
    assert 1 < logged["val/ppl"][-1].value < 300
    assert (run_dir / ".hydra" / "config.yaml").exists()  # the run's composed config sits beside it
    return logged


def final_line(stdout: str) -> tuple[float, float]:
    match = re.search(r"final validation perplexity ([\d.]+) .* validation split ([\d.]+)", stdout)
    assert match, stdout[-2000:]
    return float(match[1]), float(match[2])


@pytest.mark.timeout(300)
def test_single_process_run_writes_every_metric(tmp_path):
    out = pretrain(tmp_path, "strategy=single")
    logged = check_run(tmp_path / "runs" / "s" / "single")
    ppl, unigram = final_line(out)
    assert ppl == pytest.approx(logged["val/ppl"][-1].value, rel=1e-4) and 10 < unigram < 60


@needs_strategy
@pytest.mark.timeout(300)
def test_pipeline_run_writes_metrics_and_telemetry(tmp_path):
    out = pretrain(tmp_path, "strategy.micro_batches=4")  # the default PACI over 2 stages; batch 8 needs m | 8
    run_dir = tmp_path / "runs" / "s" / "paci-m4"
    logged = check_run(run_dir)
    ppl, _ = final_line(out)
    assert ppl == pytest.approx(logged["val/ppl"][-1].value, rel=1e-4)
    for stage in (0, 1):
        for key in ("max_drift", "utilization", "bubble_fraction", "peak_in_flight", "peak_memory_bytes"):
            assert f"pipeline/stage{stage}/{key}" in logged
        assert logged[f"pipeline/stage{stage}/optimizer_steps"][-1].value == STEPS
    assert logged["pipeline/stage0/max_drift"][-1].value == 1  # PACI, 2 stages, a=4: ceil(1/4)
    assert (run_dir / "telemetry.json").exists()


def parse_table(md: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in md.splitlines()[2:] if line.startswith("|")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


@needs_strategy
@pytest.mark.timeout(420)
def test_sweep_produces_two_runs_and_compare_matches_their_events(tmp_path):
    out = pretrain(tmp_path, "-m", "strategy=paci,pipe_1f1b", "strategy.micro_batches=4", sweep="sweep")
    assert out.count("final validation perplexity") == 2
    sweep = tmp_path / "runs" / "sweep"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["1f1b-m4", "paci-m4"]
    logged = {name: check_run(sweep / name) for name in ("paci-m4", "1f1b-m4")}

    table = run("recipes/compare.py", str(sweep))
    png, md = sweep / "compare.png", (sweep / "compare.md").read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert md in table
    rows = parse_table(md)
    assert set(rows) == {"paci-m4", "1f1b-m4"}
    final = {name: s["val/ppl"][-1].value for name, s in logged.items()}
    target = max(final.values())  # default target: the worst final perplexity
    assert f"time to ppl {target:.3f}" in md
    for name, s in logged.items():
        schedule, ppl, time_to, speedup, tokens_per_s, memory, drift = rows[name]
        assert schedule == name.split("-")[0]
        assert ppl == f"{final[name]:.3f}"
        # compare.py interpolates in log perplexity between the validations around the target; a
        # run already at the target at its first validation gets only an upper bound, no speed-up.
        ppl, elapsed = [e.value for e in s["val/ppl"]], [e.value for e in s["val/elapsed_s"]]
        i = next(k for k, p in enumerate(ppl) if p <= target)
        if i == 0:
            assert time_to == f"<= {elapsed[0]:.1f} (at 1st validation)" and speedup.startswith("– (")
        else:
            frac = (math.log(ppl[i - 1]) - math.log(target)) / (math.log(ppl[i - 1]) - math.log(ppl[i]))
            assert time_to == f"{elapsed[i - 1] + frac * (elapsed[i] - elapsed[i - 1]):.1f}"
        assert tokens_per_s == f"{s['val/tokens_seen'][-1].value / s['val/elapsed_s'][-1].value:.0f}"
        peak = max(s[f"pipeline/stage{k}/peak_memory_bytes"][-1].value for k in (0, 1))
        assert memory == f"{peak / 2**20:.1f}"
        assert drift == f"{max(s[f'pipeline/stage{k}/max_drift'][-1].value for k in (0, 1)):.0f}"
        if name == "1f1b-m4":  # the only flush run is its own reference
            assert drift == "0" and speedup == ("1.00x" if i > 0 else "– (at 1st validation)")

    custom = run("recipes/compare.py", str(sweep), "--target-ppl", "1000", "--out", str(tmp_path / "fig"))
    assert "time to ppl 1000.000" in custom and (tmp_path / "fig.png").exists()

    # The one-process replay that BENCHMARKS.md's learning sweeps use reproduces both runs' curves.
    from recipes.replay_gpt import replay

    common = [f"data.cache_dir={tmp_path / 'cache'}", *TINY]
    for name, schedule in (("paci-m4", "paci"), ("1f1b-m4", "flush")):
        curve = replay(schedule, 4, common)["curve"]
        assert [p["step"] for p in curve] == [e.step + 1 for e in logged[name]["val/ppl"]]
        for point, event in zip(curve, logged[name]["val/ppl"]):
            assert point["ppl"] == pytest.approx(event.value, rel=1e-4), name
