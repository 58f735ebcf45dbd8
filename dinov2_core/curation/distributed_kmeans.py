"""k-means over points spread across ``torch.distributed`` ranks (a pool too large for one machine).

Each rank holds a contiguous shard of the rows. The start is k-means++ on a sample of global row indices drawn with
the same seed on every rank (each rank contributes the rows it owns; a sum over ranks assembles the sample), and
every Lloyd iteration assigns the local rows to the nearest centroid and sums them per centroid; the sums and counts
are added over ranks (float64), so every rank computes the same centroids, equal to what one process computes on
all rows. Spherical (centroids re-normalised: cosine). Without an initialised process group it is one process.
The two-level variant (`distributed_hierarchical_kmeans`) runs the second level on the first level's centroids,
which every rank holds, as :func:`~dinov2_core.curation.retrieve.hierarchical_kmeans` does.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.distributed as dist

from .retrieve import kmeans, kmeans_plus_plus

__all__ = ["distributed_hierarchical_kmeans", "distributed_kmeans"]


def _sum_over_ranks(array: np.ndarray) -> np.ndarray:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only (gloo, CPU ones)
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def _global_sample(x_local: np.ndarray, offset: int, n_total: int, size: int, seed: int) -> np.ndarray:
    rows = np.sort(np.random.default_rng(seed).choice(n_total, size=min(size, n_total), replace=False))
    sample = np.zeros((len(rows), x_local.shape[1]), dtype=np.float64)
    mine = (rows >= offset) & (rows < offset + len(x_local))
    sample[mine] = x_local[rows[mine] - offset]
    return _sum_over_ranks(sample).astype(np.float32)


def _assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(np.ascontiguousarray(x, dtype=np.float32), 1)[1][:, 0].astype(np.int64)


def distributed_kmeans(
    x_local: np.ndarray, n_clusters: int, *, offset: int, n_total: int, niter: int = 20, seed: int = 0,
    sample: int = 20_000,
) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [k, d], identical on every rank; labels of this rank's rows). ``x_local``: this rank's rows
    (L2-normalised), global rows ``offset .. offset + len(x_local)`` of ``n_total``."""
    x_local = np.ascontiguousarray(x_local, dtype=np.float32)
    n_clusters = int(min(n_clusters, n_total))
    centroids = kmeans_plus_plus(_global_sample(x_local, offset, n_total, sample, seed), n_clusters, seed)
    labels = np.zeros(len(x_local), dtype=np.int64)
    for _ in range(niter):
        labels = _assign(x_local, centroids) if len(x_local) else labels
        sums = np.zeros((n_clusters, x_local.shape[1]), dtype=np.float64)
        np.add.at(sums, labels, x_local.astype(np.float64))
        counts = np.bincount(labels, minlength=n_clusters).astype(np.float64)
        both = _sum_over_ranks(np.concatenate([sums, counts[:, None]], axis=1))
        sums, counts = both[:, :-1], both[:, -1]
        filled = counts > 0  # an empty cluster keeps its centroid
        norms = np.linalg.norm(sums[filled], axis=1, keepdims=True)
        centroids[filled] = (sums[filled] / np.maximum(norms, 1e-12)).astype(np.float32)
    return centroids, _assign(x_local, centroids) if len(x_local) else labels


def distributed_hierarchical_kmeans(
    x_local: np.ndarray, n_fine: int, n_coarse: int, *, offset: int, n_total: int, niter: int = 20, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(fine label, coarse label) of this rank's rows: distributed level 1, then level 2 on the fine centroids
    (the same on every rank)."""
    fine_centroids, fine = distributed_kmeans(x_local, n_fine, offset=offset, n_total=n_total, niter=niter,
                                              seed=seed)
    _, coarse_of_fine = kmeans(fine_centroids, min(n_coarse, len(fine_centroids)), niter=niter, seed=seed,
                               plus_plus=True, n_init=10)
    return fine, coarse_of_fine[fine]
