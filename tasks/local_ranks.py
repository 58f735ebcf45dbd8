"""N ranks of a worker module on this machine under `torchrun --standalone`: the launcher of the data-parallel
curation jobs (embedding slices, ingest parts), whose ranks share no collectives, only RANK and WORLD_SIZE."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_local_ranks(module: str, args: list[str], processes: int) -> subprocess.CompletedProcess:
    """Run `python -m module *args` as `processes` ranks (one OpenMP thread each); output captured, never raised."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", module, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return subprocess.run(cmd, env=env, cwd=os.getcwd(), capture_output=True, text=True, check=False)
