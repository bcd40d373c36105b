"""recipes/compare.py on synthetic sweeps: no training, event files written with TensorBoard's own
event writer in the form Lightning's TensorBoardLogger writes (simple_value scalars).

What must hold: the time to target is read off the validation curve (interpolated in log
perplexity), a speed-up is printed only when both the run and the flush reference crossed the
target after their first validation, runs that never validated or never reached the target say so,
seeds of one configuration are summarised as median [min, max], and the figure carries the
unigram baseline, the bands and the shared setup.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from recipes import compare
from recipes.compare_plot import plot, setup_title

CONFIG = """seed: {seed}
run: {{root: runs, sweep: '${{now:%Y}}', name: x}}
model: {{n_layer: 4, n_head: 4, n_embd: 128, block_size: 128, lr: 0.002, max_steps: '${{trainer.max_steps}}'}}
data: {{_target_: recipes.data.StdlibCorpus, batch_size: 16}}
trainer: {{max_steps: 600, devices: 2}}
strategy: {{schedule: {schedule}, micro_batches: 4}}
"""


def write_run(sweep: Path, name: str, schedule: str, seed: int, val: list[tuple[int, float, float]],
              unigram: float = 20.0, train_steps: int = 10) -> Path:
    """A run folder as pretrain_gpt.py leaves it; ``val``: (step, ppl, elapsed_s) per validation,
    2048 tokens per step."""
    run_dir = sweep / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(CONFIG.format(seed=seed, schedule=schedule))
    writer = EventFileWriter(str(run_dir))

    def scalar(tag: str, value: float, step: int) -> None:
        writer.add_event(Event(step=step, wall_time=1.0 + step,
                               summary=Summary(value=[Summary.Value(tag=tag, simple_value=value)])))

    for step in range(train_steps):
        scalar("train/device/items_per_sec", 1000.0 + step, step)  # ThroughputMonitor's rate: not read
        scalar("train/loss", 3.0, step)
    for step, ppl, elapsed in val:
        scalar("val/ppl", ppl, step)
        scalar("val/elapsed_s", elapsed, step)
        scalar("val/tokens_seen", 2048.0 * (step + 1), step)
        scalar("val/unigram_ppl", unigram, step)
    writer.close()
    return run_dir


def log_interp(t0: float, p0: float, t1: float, p1: float, target: float) -> float:
    return t0 + (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p1)) * (t1 - t0)


@pytest.fixture
def seeded_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    # flush: 10 -> 6 -> 4 at 10 s, 20 s, 30 s; PACI 15% faster per step, a little worse per step.
    for seed, shift in ((1, 0.0), (2, 0.2)):
        write_run(sweep, f"1f1b-m4-s{seed}", "1f1b", seed, [(49, 10.0, 10.0), (99, 6.0 + shift, 20.0),
                                                           (149, 4.0 + shift, 30.0)])
        write_run(sweep, f"paci-m4-s{seed}", "paci", seed, [(49, 11.0, 8.5), (99, 6.5 + shift, 17.0),
                                                           (149, 4.4 + shift, 25.5)])
    return sweep


def test_time_to_target_is_interpolated_and_seeds_are_banded(seeded_sweep: Path, tmp_path: Path):
    runs = compare.find_runs(seeded_sweep)
    assert [r.name for r in runs] == ["paci-m4-s1", "paci-m4-s2", "1f1b-m4-s1", "1f1b-m4-s2"]
    target, rows = compare.summarize(runs, 5.0)
    flush = {1: log_interp(20.0, 6.0, 30.0, 4.0, 5.0), 2: log_interp(20.0, 6.2, 30.0, 4.2, 5.0)}
    paci = {1: log_interp(17.0, 6.5, 25.5, 4.4, 5.0), 2: log_interp(17.0, 6.7, 25.5, 4.6, 5.0)}
    reference = (flush[1] + flush[2]) / 2  # median of two seeds
    by_name = {row["run"]: row for row in rows}
    for seed in (1, 2):
        assert by_name[f"paci-m4-s{seed}"]["time_to_target_s"] == pytest.approx(paci[seed])
        assert by_name[f"paci-m4-s{seed}"]["speedup"] == pytest.approx(reference / paci[seed])
        assert by_name[f"1f1b-m4-s{seed}"]["speedup"] == pytest.approx(reference / flush[seed])
    md = compare.markdown(target, rows)
    assert "against 1f1b-m4, the fastest flush configuration" in md
    speedups = sorted(reference / paci[s] for s in (1, 2))
    med = sum(speedups) / 2
    assert "| paci-m4 | 2 | 4.500 [4.400, 4.600] |" in md
    assert f"{med:.2f}x [{speedups[0]:.2f}, {speedups[1]:.2f}] |" in md
    # tokens/s: the whole run's average, tokens / training seconds at the last validation
    assert by_name["paci-m4-s1"]["tokens_per_s"] == pytest.approx(2048 * 150 / 25.5)

    labels = plot(runs, target, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert labels == ["paci-m4 (2 seeds, band: lowest to highest)", "1f1b-m4 (2 seeds, band: lowest to highest)",
                      "target 5.000",
                      "unigram baseline 20.00 (ignores context)"]
    title = setup_title(runs)
    for words in ("GPT 4 layers x 128 wide, 4 heads", "peak lr 0.002", "600 steps of 16 x 128 tokens",
                  "2 stages", "StdlibCorpus", "seeds 1, 2"):
        assert words in title


def test_no_speedup_from_runs_that_never_validated_or_never_crossed(tmp_path: Path, capsys):
    sweep = tmp_path / "short"
    # A 30-step sweep validating every 50 steps: no validation at all.
    write_run(sweep, "paci-m4", "paci", 1, [])
    write_run(sweep, "1f1b-m4", "1f1b", 1, [])
    with pytest.raises(SystemExit):
        compare.main([str(sweep)])
    assert "every run stopped before its first validation" in capsys.readouterr().err

    # One validation each, and a diverged run: the default target (worst finite final) is met at the
    # first validation, which only bounds the time from above, so no speed-up is printed.
    sweep = tmp_path / "one-val"
    write_run(sweep, "paci-m4", "paci", 1, [(9, 30.0, 2.0)])
    write_run(sweep, "1f1b-m4", "1f1b", 1, [(9, 20.0, 4.0)])
    write_run(sweep, "paci-m2", "paci", 1, [(9, math.nan, 2.0)])
    write_run(sweep, "gpipe-m4", "gpipe", 1, [])
    assert compare.main([str(sweep)]) == 0
    md = (sweep / "compare.md").read_text()
    assert "time to ppl 30.000" in md
    assert "x |" not in md  # no number followed by x anywhere in the table
    row = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "<= 2.0 (at 1st validation)" in row["paci-m4"]
    assert "| nan |" not in md and "not reached" in row["paci-m2"]
    assert "never validated" in row["gpipe-m4"]
    assert "No speed-up: no flush configuration reached the target after its first validation" in md


def test_run_that_never_reaches_the_target_gets_no_speedup(seeded_sweep: Path):
    runs = compare.find_runs(seeded_sweep)
    target, rows = compare.summarize(runs, 4.1)  # flush seed 1 reaches 4.1, PACI and flush seed 2 do not
    by_name = {row["run"]: row for row in rows}
    assert by_name["paci-m4-s1"]["speedup"] is None and by_name["paci-m4-s1"]["why"] == "not reached"
    # The flush configuration's seed 2 never reaches it either, so there is no reference at all.
    assert all(row["speedup"] is None for row in rows)
    md = compare.markdown(target, rows)
    assert "| paci-m4 | 2 | 4.500 [4.400, 4.600] | – (not every seed) | – (not every seed) |" in md
