"""Worker of test_curation_distributed_kmeans.py: one rank of a gloo group on CPU (run as a script)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(rank: int, world: int, init: str, out: str) -> None:
    from dinov2_core.curation.distributed_kmeans import distributed_hierarchical_kmeans
    from tests.curation._util import clustered

    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x = clustered(3000, 32, n_centres=30, spread=0.4, seed=7)
    rows = np.array_split(np.arange(len(x)), world)[rank]  # uneven shards on purpose when world = 3
    fine, coarse = distributed_hierarchical_kmeans(x[rows], 24, 6, offset=int(rows[0]), n_total=len(x), niter=15,
                                                   seed=3)
    np.savez(f"{out}.rank{rank}.npz", fine=fine, coarse=coarse)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
