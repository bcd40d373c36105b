"""SIGTERM and SLURM's requeue signal under a pipeline: every stage acts at one agreed batch boundary.

Lightning 2.6 answers SIGTERM with a ``dist.broadcast`` from inside the signal handler (and checks
rank 0's flag with a broadcast before every batch). In a pipeline the other stages are then blocked
in point-to-point receives, not in that broadcast, so the job hung until ``timeout_s``. SLURM's
requeue signal (SIGUSR1) saves a checkpoint from inside the handler, i.e. from the middle of
whatever action the stage was running, and that save is a collective with a drain.

Here a signal only records a request, and forwards the signal to the other stage processes on this
host (a SIGTERM sent to one process reaches every stage). At its next batch boundary a stage with a
request agrees on the batch to act at through the process group's store, without waiting for
anyone: the first stage to get there writes ``K = its batches + margin`` (``compare_set``, first
writer wins) and every later one reads that K. ``margin`` is larger than the number of batches one
stage can run ahead of another (at most 2 per stage boundary: each batch of a stage needs messages
from its neighbours' same or previous batch), plus one for the batch a stage may be in when it reads
and one for signal delivery, so no stage has passed K when it learns it. At the boundary after batch
K every stage drains (the pipeline is then empty and all stages hold the same number of steps) and
then saves (requeue: Lightning's own handler, run there) or stops (SIGTERM: ``SIGTERMException``,
exit code 0, as Lightning does). No collective runs inside a batch; without a signal the boundary
check costs one attribute test.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Protocol

import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

log = logging.getLogger("lightning.pytorch.lightning_paci")  # printed where Lightning prints its own
STOP, REQUEUE = "stop", "requeue"


class Stages(Protocol):
    """What the signal handling needs of the strategy (PACIStrategy is one); a Protocol, so this module
    does not import the strategy that imports it."""

    n_stages: int
    stage: int
    world_size: int

    def drain(self) -> None: ...


class PipelineSignals:
    """Replaces the SIGTERM and requeue handlers of ``trainer``'s signal connector (call before
    Lightning registers them, i.e. in ``Strategy.setup``); ``at_batch_start`` runs at each training
    batch boundary and ``at_train_end`` after the final drain."""

    def __init__(self, trainer: Trainer, strategy: Stages) -> None:
        self.trainer, self.strategy = trainer, strategy
        self.margin = 2 * strategy.n_stages
        self.pending: dict[str, int | None] = {}  # request -> agreed batch (None: not agreed yet)
        self.signum: dict[str, int] = {}
        self.handled = {STOP: 0, REQUEUE: 0}
        host, pid = socket.gethostname(), os.getpid()
        peers: list[Any] = [None] * strategy.world_size
        dist.all_gather_object(peers, (host, pid))
        self.peers = [p for h, p in peers if h == host and p != pid]
        self.run_id = f"{peers[0][0]}:{peers[0][1]}"  # rank 0's host and pid: keys of this run only
        connector = trainer._signal_connector
        connector._sigterm_notifier_fn = self._on_sigterm
        connector._slurm_sigusr_handler_fn = self._on_requeue

    # -- signal handlers: record, forward, nothing else ------------------------------------------------
    def _on_sigterm(self, signum: int, _: Any) -> None:
        log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", self.trainer.local_rank))
        if self.trainer.state.fn != TrainerFn.FITTING:
            self.trainer._signal_connector.received_sigterm = True  # evaluation loops check it per batch
        self._request(STOP, signum)

    def _on_requeue(self, signum: int, _: Any) -> None:
        self._request(REQUEUE, signum)

    def _request(self, kind: str, signum: int) -> None:
        if kind in self.pending:
            return
        self.pending[kind], self.signum[kind] = None, signum
        for pid in self.peers:  # peers already asked ignore it
            try:
                os.kill(pid, signum)
            except OSError:
                pass

    # -- boundaries -------------------------------------------------------------------------------------
    def at_batch_start(self) -> None:
        if not self.pending:
            return
        done = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        for kind in (REQUEUE, STOP):
            if kind not in self.pending:
                continue
            at = self.pending[kind]
            if at is None:
                at = self.pending[kind] = self._agree(kind, done)
            if done >= at:
                self.strategy.drain()
                self._act(kind, at)

    def at_train_end(self) -> None:
        """Fit ended (drained) with a request still open: act now, every stage is here."""
        for kind in (REQUEUE, STOP):
            if kind in self.pending:
                self._act(kind, None)

    def _agree(self, kind: str, done: int) -> int:
        store = dist.distributed_c10d._get_default_store()
        key = f"lightning_paci/{self.run_id}/{kind}/{self.handled[kind]}"
        at = int(store.compare_set(key, "", str(done + self.margin)))
        what = "stop" if kind == STOP else "save a checkpoint for requeue"
        log.info(rank_prefixed_message(f"lightning_paci: {what}: every stage will {what} after batch {at} "
                                       f"(this stage has run {done}), after a drain", self.trainer.global_rank))
        return at

    def _act(self, kind: str, at: int | None) -> None:
        del self.pending[kind]
        self.handled[kind] += 1
        connector = self.trainer._signal_connector
        if kind == REQUEUE:
            _SignalConnector._slurm_sigusr_handler_fn(connector, self.signum[kind], None)
            return
        log.info(rank_prefixed_message(f"lightning_paci: stage {self.strategy.stage} stops on SIGTERM after "
                                       f"batch {'the last' if at is None else at}, drained",
                                       self.trainer.global_rank))
        connector.received_sigterm = True
        raise SIGTERMException()
