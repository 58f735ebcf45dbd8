"""Self-supervised retrieval of pool images close to curated seed sets (paper §3 "Self-supervised image
retrieval", App. A.3).

* sample-based: each seed image retrieves its k nearest pool images (paper: typically 4; raise it, e.g. to
  32, when the seed set is smaller);
* cluster-based: k-means of the pool (paper: 100,000 clusters), then up to a cap of pool images (paper:
  10,000) from every cluster that holds a seed image -- used when the seed set is too small for k
  neighbours per seed to yield enough images.

Embeddings are the L2-normalised backbone features (cosine = inner product).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import faiss
import numpy as np
import pandas as pd

from .knn import DEFAULT_EXACT_THRESHOLD, knn_search
from .result import CurationResult

__all__ = [
    "LARGE_SEED_SET",
    "PER_CLUSTER_CAP",
    "SAMPLE_K",
    "cluster_based_retrieval",
    "kmeans",
    "retrieve",
    "sample_based_retrieval",
]

SAMPLE_K = 4  # paper §3: N (typically 4) nearest neighbours per seed image
PER_CLUSTER_CAP = 10_000  # paper App. A.3: images sampled from each cluster associated with a seed
# Seed sets at least this large use sample-based retrieval. The paper decides per dataset (App. A.3); the
# 1M default is ours -- pass ``large_seed_set`` to match a given setup.
LARGE_SEED_SET = 1_000_000

_COLUMNS = ["key", "seed_neighbour", "similarity", "cluster", "method"]


def _unit(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got {x.shape}")
    return x


def _ids(ids: Sequence | None, n: int, name: str) -> np.ndarray:
    out = np.arange(n) if ids is None else np.asarray(ids, dtype=object)
    if len(out) != n:
        raise ValueError(f"{name} must have {n} entries")
    return out


def sample_based_retrieval(
    pool_embeddings: np.ndarray,
    pool_keys: Sequence[str],
    seed_embeddings: np.ndarray,
    seed_ids: Sequence | None = None,
    *,
    k: int = SAMPLE_K,
    min_similarity: float | None = None,
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    nlist: int | None = None,
    nprobe: int = 32,
    progress: bool = False,
) -> CurationResult:
    """k nearest pool images of every seed, each pool image once (kept with its most similar seed;
    ties -> lowest seed index). Rows ordered by pool index. ``cluster`` is -1 (not used). Returns
    ``CurationResult(frame, metrics)`` (metrics empty when the pool or the seed set is empty)."""
    pool = _unit(pool_embeddings, "pool_embeddings")
    seeds = _unit(seed_embeddings, "seed_embeddings")
    keys = _ids(pool_keys, len(pool), "pool_keys")
    sids = _ids(seed_ids, len(seeds), "seed_ids")
    if len(pool) == 0 or len(seeds) == 0:
        return CurationResult(pd.DataFrame(columns=_COLUMNS), {})
    knn = knn_search(
        pool,
        seeds,
        k=min(k, len(pool)),
        exact_threshold=exact_threshold,
        nlist=nlist,
        nprobe=nprobe,
        progress=progress,
    )
    seed_idx = np.broadcast_to(np.arange(len(seeds))[:, None], knn.ids.shape).ravel()
    pid, sim = knn.ids.ravel(), knn.sims.ravel()
    ok = pid >= 0
    if min_similarity is not None:
        ok &= sim > np.float32(min_similarity)
    pid, sim, seed_idx = pid[ok], sim[ok], seed_idx[ok]
    order = np.lexsort((seed_idx, -sim, pid))
    pid, sim, seed_idx = pid[order], sim[order], seed_idx[order]
    first = np.ones(pid.size, dtype=bool)
    first[1:] = pid[1:] != pid[:-1]
    df = pd.DataFrame(
        {
            "key": keys[pid[first]],
            "seed_neighbour": sids[seed_idx[first]],
            "similarity": sim[first].astype(np.float64),
            "cluster": np.full(int(first.sum()), -1, dtype=np.int64),
            "method": "sample",
        }
    )
    metrics = {
        "method": "sample",
        "k": int(k),
        "n_seeds": len(seeds),
        "n_retrieved": len(df),
        "n_raw_hits": int(pid.size),
        **knn.metrics(),
    }
    return CurationResult(df, metrics)


def kmeans(
    embeddings: np.ndarray, n_clusters: int, *, niter: int = 20, seed: int = 0, spherical: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means (spherical: centroids re-normalised, matching cosine). Returns (centroids, labels)."""
    x = _unit(embeddings, "embeddings")
    n_clusters = int(min(n_clusters, len(x)))
    km = faiss.Kmeans(
        x.shape[1],
        n_clusters,
        niter=niter,
        seed=seed,
        spherical=spherical,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=256,
    )
    km.train(x)
    _, labels = km.index.search(x, 1)
    return km.centroids.copy(), labels[:, 0].astype(np.int64)


def _assign(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, lab = index.search(x, 1)
    return lab[:, 0].astype(np.int64)


def cluster_based_retrieval(
    pool_embeddings: np.ndarray,
    pool_keys: Sequence[str],
    seed_embeddings: np.ndarray,
    seed_ids: Sequence | None = None,
    *,
    n_clusters: int,
    per_cluster: int = PER_CLUSTER_CAP,
    seed: int = 0,
    niter: int = 20,
    centroids: np.ndarray | None = None,
    pool_labels: np.ndarray | None = None,
) -> CurationResult:
    """Up to ``per_cluster`` pool images from every k-means cluster that holds a seed image.

    Seeds are assigned to their nearest centroid. Sampling is without replacement, deterministic given
    ``seed`` (each cluster uses its own generator seeded by (seed, cluster)). ``seed_neighbour`` is the
    most similar seed among those assigned to the cluster. Precomputed ``centroids`` / ``pool_labels``
    (from :func:`kmeans`) can be passed to reuse one clustering for several seed sets. Returns
    ``CurationResult(frame, metrics)`` (metrics empty when the pool or the seed set is empty).
    """
    pool = _unit(pool_embeddings, "pool_embeddings")
    seeds = _unit(seed_embeddings, "seed_embeddings")
    keys = _ids(pool_keys, len(pool), "pool_keys")
    sids = _ids(seed_ids, len(seeds), "seed_ids")
    if len(pool) == 0 or len(seeds) == 0:
        return CurationResult(pd.DataFrame(columns=_COLUMNS), {})
    if centroids is None:
        centroids, pool_labels = kmeans(pool, n_clusters, niter=niter, seed=seed)
    elif pool_labels is None:
        pool_labels = _assign(pool, centroids)
    seed_labels = _assign(seeds, centroids)

    parts = []
    clusters = np.unique(seed_labels)
    for c in clusters.tolist():
        members = np.flatnonzero(pool_labels == c)
        if members.size > per_cluster:
            rng = np.random.default_rng([seed, c])
            members = np.sort(rng.choice(members, size=per_cluster, replace=False))
        if members.size == 0:
            continue
        cs = np.flatnonzero(seed_labels == c)
        sims = pool[members] @ seeds[cs].T
        best = sims.argmax(axis=1)  # first max -> lowest seed index on ties
        parts.append(
            pd.DataFrame(
                {
                    "key": keys[members],
                    "seed_neighbour": sids[cs[best]],
                    "similarity": sims[np.arange(members.size), best].astype(np.float64),
                    "cluster": np.full(members.size, c, dtype=np.int64),
                    "method": "cluster",
                }
            )
        )
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=_COLUMNS)
    sizes = np.bincount(pool_labels, minlength=len(centroids))
    metrics = {
        "method": "cluster",
        "n_clusters": len(centroids),
        "n_seeds": len(seeds),
        "n_seed_clusters": int(clusters.size),
        "per_cluster": int(per_cluster),
        "n_retrieved": len(df),
        "empty_clusters": int((sizes == 0).sum()),
        "seed": int(seed),
    }
    return CurationResult(df, metrics)


def retrieve(
    pool_embeddings: np.ndarray,
    pool_keys: Sequence[str],
    seed_embeddings: np.ndarray,
    seed_ids: Sequence | None = None,
    *,
    large_seed_set: int = LARGE_SEED_SET,
    k: int = SAMPLE_K,
    n_clusters: int | None = None,
    per_cluster: int = PER_CLUSTER_CAP,
    seed: int = 0,
    **knn_kwargs,
) -> CurationResult:
    """Paper's chooser: sample-based retrieval for seed sets of at least ``large_seed_set`` images,
    cluster-based otherwise (``n_clusters`` defaults to ~sqrt(pool size)). Returns the chosen method's
    :class:`CurationResult`."""
    n_seeds = len(seed_embeddings)
    if n_seeds >= large_seed_set:
        return sample_based_retrieval(
            pool_embeddings, pool_keys, seed_embeddings, seed_ids, k=k, **knn_kwargs
        )
    if n_clusters is None:
        n_clusters = max(1, round(math.sqrt(len(pool_embeddings))))
    return cluster_based_retrieval(
        pool_embeddings,
        pool_keys,
        seed_embeddings,
        seed_ids,
        n_clusters=n_clusters,
        per_cluster=per_cluster,
        seed=seed,
    )
