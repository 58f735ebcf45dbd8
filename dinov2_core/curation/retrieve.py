"""Self-supervised retrieval of pool images close to curated seed sets (paper §3 "Self-supervised image
retrieval", App. A.3).

* sample-based: each seed image retrieves its k nearest pool images (paper: typically 4; raise it, e.g. to
  32, when the seed set is smaller);
* cluster-based: k-means of the pool (paper: 100,000 clusters), then up to a cap of pool images (paper:
  10,000) from every cluster that holds a seed image -- used when the seed set is too small for k
  neighbours per seed to yield enough images;
* balanced (no seed set): k-means of the pool, then the same number of images from every cluster, so the crawl's
  dense modes (one product photographed a thousand times) stop outweighing its long tail -- the balancing of
  clustering-based curation (Vo et al. 2024, "Automatic data curation for self-supervised learning", §3; DINOv3's
  LVD-1689M, §3.1), at one level.

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
    "balanced_quota",
    "balanced_sampling",
    "cluster_based_retrieval",
    "hierarchical_kmeans",
    "kmeans",
    "kmeans_plus_plus",
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


def kmeans_plus_plus(x: np.ndarray, n_clusters: int, seed: int = 0, sample: int = 20_000) -> np.ndarray:
    """k-means++ seeding (D² sampling, Arthur & Vassilvitskii 2007) on a random sample of at most ``sample`` rows:
    far-apart starting centroids, so a small, distant mode gets a centroid of its own instead of the dense modes
    taking them all, as faiss's uniform-random start does when most points sit in a few modes."""
    rng = np.random.default_rng(seed)
    if len(x) > sample:
        x = x[np.sort(rng.choice(len(x), size=sample, replace=False))]
    centres = [int(rng.integers(len(x)))]
    d2 = np.maximum(2.0 - 2.0 * (x @ x[centres[0]]), 0.0)  # squared distance of unit vectors
    for _ in range(1, n_clusters):
        total = float(d2.sum())
        nxt = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        centres.append(nxt)
        d2 = np.minimum(d2, np.maximum(2.0 - 2.0 * (x @ x[nxt]), 0.0))
    return np.ascontiguousarray(x[centres], dtype=np.float32)


def kmeans(
    embeddings: np.ndarray, n_clusters: int, *, niter: int = 20, seed: int = 0, spherical: bool = True,
    plus_plus: bool = False, n_init: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means (spherical: centroids re-normalised, matching cosine), started from k-means++ seeds with
    ``plus_plus``; with ``n_init`` > 1 the best of that many starts (lowest sum of squared distances) is kept.
    Returns (centroids, labels)."""
    x = _unit(embeddings, "embeddings")
    n_clusters = int(min(n_clusters, len(x)))
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for run in range(n_init):
        km = faiss.Kmeans(
            x.shape[1],
            n_clusters,
            niter=niter,
            seed=seed + run,
            spherical=spherical,
            verbose=False,
            min_points_per_centroid=1,
            max_points_per_centroid=256,
        )
        km.train(x, init_centroids=kmeans_plus_plus(x, n_clusters, seed + run) if plus_plus else None)
        scores, labels = km.index.search(x, 1)
        # spherical k-means searches by inner product (unit vectors: squared distance = 2 - 2 * similarity)
        ip = km.index.metric_type == faiss.METRIC_INNER_PRODUCT
        inertia = float((2.0 - 2.0 * scores).sum() if ip else scores.sum())
        if best is None or inertia < best[0]:
            best = (inertia, km.centroids.copy(), labels[:, 0].astype(np.int64))
    assert best is not None
    return best[1], best[2]


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


def balanced_quota(sizes: np.ndarray, target: int) -> int:
    """The largest per-cluster quota q with sum(min(size, q)) <= target (water-filling: small clusters are kept
    whole, large ones cut to the same q)."""
    lo, hi = 0, int(sizes.max(initial=0))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(np.minimum(sizes, mid).sum()) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def hierarchical_kmeans(
    x: np.ndarray, n_fine: int, n_coarse: int, *, niter: int = 20, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Two-level k-means (Vo et al. 2024 §3): ``n_fine`` clusters of the points, then ``n_coarse`` clusters of the
    fine centroids, each centroid counting once whatever its size. A dense mode that flat k-means splits into many
    fine clusters becomes one coarse cluster again. Returns (fine label, coarse label) per point."""
    fine_centroids, fine = kmeans(x, n_fine, niter=niter, seed=seed, plus_plus=True)
    _, coarse_of_fine = kmeans(fine_centroids, min(n_coarse, len(fine_centroids)), niter=niter, seed=seed,
                               plus_plus=True, n_init=10)  # a few hundred points: ten starts cost nothing
    return fine, coarse_of_fine[fine]


def _water_fill(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """How many to take from each group: the balanced quota, then one more from randomly chosen larger groups
    until ``target`` (or everything) is taken."""
    target = min(int(target), int(sizes.sum()))
    quota = balanced_quota(sizes, target)
    take = np.minimum(sizes, quota)
    larger = np.flatnonzero(sizes > quota)
    take[rng.permutation(larger)[: target - int(take.sum())]] += 1
    return take


def balanced_sampling(
    pool_embeddings: np.ndarray,
    pool_keys: Sequence[str],
    *,
    n_clusters: int,
    target: int,
    fine_per_cluster: int = 4,
    seed: int = 0,
    niter: int = 20,
) -> CurationResult:
    """About ``target`` pool images spread evenly over the pool's ``n_clusters`` coarse clusters, and inside each
    evenly over its fine clusters (hierarchical k-means, ``fine_per_cluster`` fine clusters per coarse one): the
    seedless curation. Every choice is random but fixed by ``seed``; ``cluster`` is the coarse cluster and
    ``similarity`` the cosine to the image's fine centroid."""
    pool = _unit(pool_embeddings, "pool_embeddings")
    keys = _ids(pool_keys, len(pool), "pool_keys")
    if len(pool) == 0 or target <= 0:
        return CurationResult(pd.DataFrame(columns=_COLUMNS), {})
    fine, coarse = hierarchical_kmeans(pool, n_clusters * fine_per_cluster, n_clusters, niter=niter, seed=seed)
    rng = np.random.default_rng(seed)
    coarse_sizes = np.bincount(coarse)
    take_coarse = _water_fill(coarse_sizes, target, rng)
    chosen = []
    for c in np.flatnonzero(take_coarse).tolist():
        children = np.unique(fine[coarse == c])
        child_sizes = np.array([(fine == f).sum() for f in children])
        for f, n in zip(children.tolist(), _water_fill(child_sizes, int(take_coarse[c]), rng).tolist()):
            members = np.flatnonzero(fine == f)
            if n:
                chosen.append(np.sort(rng.choice(members, size=n, replace=False)) if n < members.size else members)
    rows = np.sort(np.concatenate(chosen))
    centroid = np.stack([pool[fine == f].mean(0) for f in range(int(fine.max()) + 1)])
    centroid /= np.maximum(np.linalg.norm(centroid, axis=1, keepdims=True), 1e-12)
    df = pd.DataFrame({
        "key": keys[rows],
        "seed_neighbour": None,
        # a cosine: clipped, since stored vectors are unit only to float16 precision
        "similarity": np.clip(np.einsum("nd,nd->n", pool[rows], centroid[fine[rows]]), -1.0, 1.0).astype(np.float64),
        "cluster": coarse[rows].astype(np.int64),
        "method": "balanced",
    })
    kept_sizes = np.bincount(coarse[rows], minlength=len(coarse_sizes))
    metrics = {
        "method": "balanced",
        "n_clusters": len(coarse_sizes),
        "n_fine_clusters": int(fine.max()) + 1,
        "quota": int(balanced_quota(coarse_sizes, min(int(target), len(pool)))),
        "n_retrieved": len(df),
        "largest_cluster_share_pool": round(float(coarse_sizes.max() / len(pool)), 4),
        "largest_cluster_share_kept": round(float(kept_sizes.max() / len(df)), 4),
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
