"""Two-level k-means over points spread across 2 gloo processes gives the labels one process gives on all points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("kmeans_worker.py")


def _run(world: int, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    out = tmp_path / f"world{world}"
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), f"file://{tmp_path}/pg{world}",
                               str(out)], stderr=subprocess.PIPE, text=True) for r in range(world)]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errs)[-3000:]
    parts = [np.load(f"{out}.rank{r}.npz") for r in range(world)]
    return np.concatenate([p["fine"] for p in parts]), np.concatenate([p["coarse"] for p in parts])


def test_two_ranks_cluster_as_one_process(tmp_path):
    fine1, coarse1 = _run(1, tmp_path)
    fine2, coarse2 = _run(2, tmp_path)
    assert len(fine1) == 3000 and len(np.unique(fine1)) > 12 and len(np.unique(coarse1)) == 6
    assert np.array_equal(fine1, fine2) and np.array_equal(coarse1, coarse2)
