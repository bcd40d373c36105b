"""Faults and bad input: signals, lost stages, meta tensors reaching real compute, misconfigurations.

Every multi-process run here is bounded: the strategy's ``timeout_s`` is small, each subprocess has a
hard timeout, and whatever a test started is killed (its whole session) when the test ends.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_paci import PACIStrategy
from lightning_paci.checkpoint import check_layout
from lightning_paci.checks import check_last_batch
from lightning_paci.hollow import PartitionError, StageView
from lightning_paci.partition import partition_model
from tests.models import LitTiny, TinyGPT, token_data
from tests.test_pipeline_correctness import SCRIPT

ROOT = Path(__file__).resolve().parents[1]


class Job:
    """The pipeline script started in sessions of its own, so that a test can always end all of it.

    ``slurm=N`` starts N processes the way srun does (SLURM_* variables, one task per stage);
    otherwise one process whose launcher starts the other stages.
    """

    def __init__(self, out: Path, *args: str, slurm: int = 0) -> None:
        self.out = out
        cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--pid-files", *args]
        self.log = open(out / "log.txt", "w")
        envs = [None]
        if slurm:
            port = str(29600 + os.getpid() % 300)
            fake = out / "bin"  # a stand-in scontrol records the requeue (never requeue a real job)
            fake.mkdir()
            record = out / "scontrol.txt"
            (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
            (fake / "scontrol").chmod(0o755)
            common = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}",
                      "SLURM_NTASKS": str(slurm), "SLURM_NTASKS_PER_NODE": str(slurm),
                      "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_ID": "4242",
                      "SLURM_JOB_NAME": "paci-test", "SLURM_NODELIST": "127.0.0.1",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            envs = [{**common, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in range(slurm)]
        self.procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True) for env in envs]
        self.proc = self.procs[0]

    def pid(self, rank: int, timeout: float = 60) -> int:
        path = self.out / f"pid_rank{rank}"
        deadline = time.monotonic() + timeout
        while not path.exists() or not path.read_text():
            assert self.proc.poll() is None, f"the job ended early:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        return int(path.read_text())

    def wait_for(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.proc.poll() is None, f"the job ended early:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"{path} did not appear"
            time.sleep(0.05)

    def output(self) -> str:
        self.log.flush()
        return (self.out / "log.txt").read_text()

    def alive(self) -> list[int]:
        """Processes of the job still running (its sessions hold every stage process it started)."""
        found = []
        for proc in self.procs:
            pgrep = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
            found += [int(p) for p in pgrep.stdout.split()]
        return found

    def close(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def job(tmp_path):
    jobs: list[Job] = []

    def start(*args: str, slurm: int = 0) -> Job:
        jobs.append(Job(tmp_path, *args, slurm=slurm))
        return jobs[-1]
    yield start
    for j in jobs:
        j.close()


def _ended_within(job: Job, seconds: float) -> float:
    start = time.monotonic()
    try:
        for proc in job.procs:
            proc.wait(timeout=max(0.1, seconds - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job still ran {seconds} s after the signal:\n{job.output()[-3000:]}")
    while job.alive() and time.monotonic() - start < seconds:
        time.sleep(0.05)
    assert not job.alive(), f"stage processes outlived the job: {job.alive()}"
    print(f"MEASURE all processes ended {time.monotonic() - start:.2f} s after the signal/start")
    return time.monotonic() - start


# -- 1. SIGTERM -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 1])
def test_sigterm_to_any_stage_stops_every_stage_at_a_drain(job, tmp_path, rank):
    """A preempted job: SIGTERM to one stage process. Every stage stops within seconds, after a drain,
    exit code 0 as Lightning's own SIGTERM handling gives, and every checkpoint on disk is complete."""
    ckpt = tmp_path / "ckpt"
    j = job("--schedule", "paci", "--steps", "2000", "--epoch-batches", "4", "--ckpt-dir", str(ckpt),
            "--slow-ms", "5", "--timeout", "20")
    pids = {r: j.pid(r) for r in (0, 1)}
    j.wait_for(ckpt / "epoch=0-step=4.ckpt")
    time.sleep(0.5)
    os.kill(pids[rank], signal.SIGTERM)
    # well inside the 20 s timeout_s, so the stop came from the drain, not from a neighbour timing out
    # (no tighter bound: a timed assertion would fail on a loaded machine, not on a wrong stop)
    _ended_within(j, 15)
    out = j.output()
    assert j.proc.returncode == 0, out[-3000:]
    assert "stops on SIGTERM after batch" in out, out[-3000:]
    saved = sorted(ckpt.glob("*.ckpt"))
    assert saved and all((c / "meta.pt").is_file() for c in saved)


def test_slurm_requeue_signal_saves_at_a_batch_boundary_and_training_goes_on(job, tmp_path):
    """SLURM's requeue signal (SIGUSR1, to one task only here) lands mid-action; the checkpoint is saved
    by every stage at one agreed batch boundary, training continues, and the SIGTERM that follows a
    requeue stops the job cleanly."""
    j = job("--schedule", "paci", "--steps", "2000", "--epoch-batches", "4", "--slow-ms", "5",
            "--timeout", "20", "--root-dir", str(tmp_path), slurm=2)
    pids = {r: j.pid(r) for r in (0, 1)}
    time.sleep(1.0)
    os.kill(pids[1], signal.SIGUSR1)
    saved = tmp_path / "hpc_ckpt_1.ckpt"
    j.wait_for(saved / "meta.pt", timeout=20)
    time.sleep(1.0)
    assert all(p.poll() is None for p in j.procs), j.output()[-3000:]  # it trains on after the save
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    _ended_within(j, 15)
    assert [p.returncode for p in j.procs] == [0, 0], j.output()[-3000:]
    out = j.output()
    assert out.count("save a checkpoint for requeue after batch") == 2, out[-3000:]
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]  # rank 0 only, once
    assert not list(tmp_path.glob("*.tmp"))


# -- 2. a stage that stops answering ---------------------------------------------------------------------
def test_hung_stage_is_named_as_silent_and_does_not_outlive_the_job(job):
    """Stage 0 (rank 1, started by rank 0's launcher) hangs in its forward. Rank 0 fails at timeout_s
    saying its neighbour stopped answering and for how long, and the hung process ends with the job."""
    j = job("--schedule", "paci", "--steps", "50", "--fail-unit", "model.transformer.h.0", "--fail-step", "3",
            "--hang", "--timeout", "8")
    hung = j.pid(1)
    start = time.monotonic()
    _ended_within(j, 40)
    out = j.output()
    assert j.proc.returncode != 0
    assert "the neighbour stopped answering: nothing came for 8 s (timeout_s)" in out, out[-3000:]
    assert "see its own error" not in out
    assert not Path(f"/proc/{hung}").exists()
    assert time.monotonic() - start < 30


def test_a_stage_busy_in_its_own_compute_ends_when_another_stage_fails(job):
    """Started as srun does (no launcher that could kill anyone): the last stage (rank 0) hangs in its
    own compute, where no receive can fail. Stage 0 gives up at timeout_s and leaves a failure note;
    the hung stage's FailureWatch reads it and ends that process, quoting it: on NCCL, where a wait
    does not block the host, this is how a stage blocked in a device sync learns of a failure."""
    j = job("--schedule", "paci", "--steps", "50", "--fail-unit", "model.transformer.h.3", "--fail-step", "3",
            "--hang", "--timeout", "8", slurm=2)
    hung = j.pid(0)
    start = time.monotonic()
    _ended_within(j, 45)
    out = j.output()
    assert "stage 1 ends because another stage failed 5 s ago" in out, out[-3000:]
    assert "the neighbour stopped answering: nothing came for 8 s (timeout_s)" in out, out[-3000:]
    assert not Path(f"/proc/{hung}").exists()
    assert time.monotonic() - start < 35


# -- 5. meta tensors never reach real compute -----------------------------------------------------------
class _TiedInForward(TinyGPT):
    """Weight tying written in the forward: the head reuses the stage-0 embedding's weight."""

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.size(1)))
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x) @ self.transformer.wte.weight.T


class _PositionsReusedLate(TinyGPT):
    """A tensor computed by a stage-0 module (the position embedding) used again after stage 1 began."""

    def forward(self, idx):
        pos = self.transformer.wpe(torch.arange(idx.size(1)))
        x = self.transformer.wte(idx) + pos
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x + pos))


@pytest.mark.parametrize("make,origin", [
    (_TiedInForward, "parameter transformer.wte.weight (stage 0)"),
    (_PositionsReusedLate, "the output of transformer.wpe (stage 0)"),
])
@pytest.mark.parametrize("grad", [True, False])
def test_a_meta_tensor_reaching_real_compute_raises_naming_its_origin(make, origin, grad):
    """On fedc153 the tied head computed garbage from the meta weight (validate: val_loss=inf, no error)."""
    torch.manual_seed(0)
    model = make(n_layers=2)
    part = partition_model(model, 2, ["transformer.h.1"])
    units = dict(zip(part.units, part.stage_of))
    idx = torch.randint(0, 32, (2, 8))
    stages = [copy.deepcopy(model) for _ in range(2)]
    views = [StageView(m, units, s, 2) for s, m in enumerate(stages)]
    with torch.set_grad_enabled(grad):
        _, sent = views[0].run(lambda: stages[0](idx), [])
        received = [t.detach().requires_grad_(grad) for t in sent]
        with pytest.raises(PartitionError, match=re.escape(origin) + ".*reached real compute"):
            views[1].run(lambda: stages[1](idx), received)


def test_marked_hollow_tensors_stay_usable_for_bookkeeping():
    """What the strategy does with other stages' parameters (is_meta, numel, state_dict, .T) still works."""
    model = TinyGPT(n_layers=2)
    part = partition_model(model, 2, ["transformer.h.1"])
    StageView(model, dict(zip(part.units, part.stage_of)), 1, 2)
    weight = model.transformer.wte.weight
    assert weight.is_meta and weight.numel() == 32 * 16 and weight.T.shape == (16, 32)
    hollow = {k for k, v in model.state_dict().items() if v.is_meta}
    assert "transformer.wte.weight" in hollow and "lm_head.weight" not in hollow


# -- 7. smaller misconfigurations -----------------------------------------------------------------------
class _Plateau(LitTiny):
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
        config = {"scheduler": sched, "interval": "step", "monitor": "train_loss"}
        return {"optimizer": opt, "lr_scheduler": config}


class _EpochScheduler(LitTiny):
    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}


@pytest.mark.parametrize("make,message,not_said", [
    (_Plateau, "ReduceLROnPlateau steps on a monitored metric, which only the last pipeline stage",
     "got interval='step'"),
    (_EpochScheduler, "StepLR has interval='epoch'", None),
])
def test_lr_scheduler_refusals_say_what_is_wrong(make, message, not_said):
    """On fedc153 the plateau refusal read "must use interval='step' ... got interval='step'"."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=PACIStrategy(), logger=False)
    model = make()
    model.trainer = trainer
    trainer.strategy._lightning_module = model
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        trainer.strategy.setup_optimizers(trainer)
    assert not_said is None or not_said not in str(error.value)


def test_a_short_last_batch_micro_batches_cannot_split_fails_before_launch():
    """On fedc153 it failed at the end of the first epoch, after training it."""
    x, y = token_data(66)
    data = DataLoader(TensorDataset(x, y), batch_size=8, drop_last=False)  # last batch: 2 samples
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=PACIStrategy(micro_batches=4), max_epochs=1,
                        logger=False, enable_progress_bar=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"last batch of every epoch has 2 samples .* drop_last=True"):
        trainer.fit(LitTiny(), data)
    assert not torch.distributed.is_initialized()
    check_last_batch(DataLoader(TensorDataset(x[:64], y[:64]), batch_size=8), 4)  # 8 full batches: fine
    check_last_batch(data, 4, max_steps=8)  # the short batch is never reached


def test_resuming_under_another_schedule_warns():
    saved = {"n_stages": 2, "schedule": "paci", "units": []}
    with pytest.warns(UserWarning, match="saved by a 'paci' run .* schedule='1f1b'"):
        check_layout("last.ckpt", saved, {**saved, "schedule": "1f1b"})


# -- 4 (part). a non-finite loss is reported where it first appears ------------------------------------
def test_first_nonfinite_loss_is_reported_with_its_stage_and_step(tmp_path):
    """On ab00b0f a NaN loss turned every parameter of every stage into NaN without a word."""
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--schedule", "paci", "--steps", "6",
           "--nan-step", "3", "--timeout", "30"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "stage 1 computed a non-finite loss (nan) for micro-batch 12 (batch_idx 3, after 3 optimizer" in out
    assert out.count("computed a non-finite loss") == 1
