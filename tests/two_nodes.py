"""Two "nodes" on this machine: two torchrun invocations with ``--nnodes 2`` on loopback (gloo), each
starting 2 processes, train R=2 replicas of a 2-stage 1F1B pipeline (each node holds one replica's
whole pipeline; a stage's replicas span the nodes). Checks the result against one process trained on
the concatenated batch, the reference the one-node run (tests/test_replicas.py) also matches.

    python tests/two_nodes.py            # prints the measured time and the largest difference

Not in the suite: two torchrun rendezvous and four Lightning start-ups take ~40 s on 2 shared cores.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.reference import replica_batches, train_reference  # noqa: E402
from tests.test_replicas import BATCH, LAYERS, STEPS, concatenated  # noqa: E402


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="paci_two_nodes_"))
    script = ["tests/pipeline_script.py", "--schedule", "1f1b", "--stages", "2", "--replicas", "2", "--num-nodes",
              "2", "--steps", str(STEPS), "--batch-size", str(BATCH), "--out", str(out)]
    start = time.perf_counter()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
                               "2", "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port",
                               "29533", *script], cwd=ROOT) for node in (0, 1)]
    codes = [p.wait(timeout=300) for p in nodes]
    took = time.perf_counter() - start
    assert codes == [0, 0], f"torchrun exit codes {codes}"
    params = {}
    for f in sorted(out.glob("stage*.pt")):
        params.update(torch.load(f))
    expected = train_reference(LAYERS, concatenated(replica_batches(BATCH, STEPS, 2)))
    assert set(params) == set(expected)
    diff = max((params[k] - expected[k]).abs().max().item() for k in expected)
    assert diff < 1e-10, diff
    print(f"two nodes x 2 processes: trained {STEPS} steps in {took:.1f} s (both torchruns, start-up included); "
          f"largest difference from one process on the concatenated batch: {diff:.2e}")


if __name__ == "__main__":
    main()
