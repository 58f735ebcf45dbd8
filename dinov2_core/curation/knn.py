"""Cosine k-nearest-neighbour search with faiss (paper §3 and App. A: every curation step is a kNN query).

Vectors are expected to be L2-normalised, so inner product == cosine similarity. Below ``exact_threshold``
database vectors an exact ``IndexFlatIP`` is used; above it an ``IndexIVFFlat`` (inner-product metric), whose
recall is governed by ``nlist`` / ``nprobe``. Results are plain arrays so callers decide what to store.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
from tqdm.auto import tqdm

__all__ = ["DEFAULT_EXACT_THRESHOLD", "KnnResult", "build_index", "default_nlist", "knn_search"]

# A flat k=64 graph costs O(N^2 d): on 2 shared CPU cores 100k x 384 takes ~70-160 s exact vs ~18 s IVF
# (nprobe 16, recall@64 ~1.0 on clustered data), see benchmarks/curation_algos.py. Exact below 50k vectors.
DEFAULT_EXACT_THRESHOLD = 50_000
# faiss wants >= 39 training points per centroid, otherwise it warns and clusters poorly.
_MIN_POINTS_PER_CENTROID = 39


@dataclass
class KnnResult:
    """Neighbours of each query, best first. Missing neighbours (k > pool) are id -1, similarity -inf."""

    sims: np.ndarray  # float32 [n_queries, k]
    ids: np.ndarray  # int64 [n_queries, k], row indices into the database
    index_type: str  # "flat" or "ivf"
    build_seconds: float
    search_seconds: float
    params: dict = field(default_factory=dict)

    @property
    def n_queries(self) -> int:
        return int(self.ids.shape[0])

    @property
    def queries_per_s(self) -> float:
        return self.n_queries / self.search_seconds if self.search_seconds > 0 else float("inf")

    def metrics(self) -> dict:
        """Flat dict for run metrics (which index was used and how fast it was)."""
        return {
            "knn_index": self.index_type,
            "knn_queries": self.n_queries,
            "knn_k": int(self.ids.shape[1]),
            "knn_build_s": round(self.build_seconds, 4),
            "knn_search_s": round(self.search_seconds, 4),
            "knn_queries_per_s": round(self.queries_per_s, 1),
            **{f"knn_{k}": v for k, v in self.params.items()},
        }


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values")
    return x


def default_nlist(n: int) -> int:
    """~4*sqrt(n) inverted lists (faiss guideline), capped so every centroid gets enough training points."""
    return max(1, min(int(4 * math.sqrt(n)), n // _MIN_POINTS_PER_CENTROID))


def build_index(
    xb: np.ndarray,
    *,
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    nlist: int | None = None,
    nprobe: int = 32,
    max_train_points: int = 256 * 1024,
    seed: int = 0,
) -> faiss.Index:
    """Exact flat IP index for small pools, IVF-Flat (IP) above ``exact_threshold`` vectors."""
    xb = _as_matrix(xb, "xb")
    n, d = xb.shape
    if n <= exact_threshold:
        index = faiss.IndexFlatIP(d)
        index.add(xb)
        return index
    nlist = nlist or default_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed  # deterministic coarse centroids
    index.cp.spherical = True  # centroids on the unit sphere, consistent with cosine
    n_train = min(n, max(nlist * 64, min(max_train_points, n)))
    rng = np.random.default_rng(seed)
    train = xb if n_train >= n else xb[np.sort(rng.choice(n, n_train, replace=False))]
    index.train(train)
    index.add(xb)
    index.nprobe = min(nprobe, nlist)
    return index


def _drop_self(sims: np.ndarray, ids: np.ndarray, row_offset: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from its k+1 results (it is not always first when exact ties exist)."""
    own = np.arange(row_offset, row_offset + ids.shape[0])[:, None]
    drop = ids == own
    missing = ~drop.any(axis=1)
    drop[missing, -1] = True  # self not returned (IVF / ties beyond k+1): drop the worst instead
    keep = ~drop
    return sims[keep].reshape(-1, k), ids[keep].reshape(-1, k)


def knn_search(
    xb: np.ndarray,
    xq: np.ndarray | None = None,
    k: int = 64,
    *,
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    nlist: int | None = None,
    nprobe: int = 32,
    batch_size: int = 8192,
    seed: int = 0,
    progress: bool = False,
    index: faiss.Index | None = None,
) -> KnnResult:
    """k most similar database rows for each query.

    ``xq=None`` is a self-search over ``xb``: each row's own id is excluded, so a row's neighbours are other
    rows only. Otherwise ``xq`` is searched against ``xb`` (pool-vs-query). A prebuilt ``index`` over ``xb``
    may be passed to reuse it across calls.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    xb = _as_matrix(xb, "xb")
    self_search = xq is None
    xq = xb if self_search else _as_matrix(xq, "xq")
    if xq.shape[1] != xb.shape[1]:
        raise ValueError(f"dimension mismatch: xb has d={xb.shape[1]}, xq has d={xq.shape[1]}")

    t0 = time.perf_counter()
    if index is None:
        index = build_index(xb, exact_threshold=exact_threshold, nlist=nlist, nprobe=nprobe, seed=seed)
    build_s = time.perf_counter() - t0
    is_ivf = isinstance(index, faiss.IndexIVF)
    params = {"nlist": int(index.nlist), "nprobe": int(index.nprobe)} if is_ivf else {}

    k_search = k + 1 if self_search else k
    nq = xq.shape[0]
    sims = np.empty((nq, k), dtype=np.float32)
    ids = np.empty((nq, k), dtype=np.int64)
    t1 = time.perf_counter()
    starts = range(0, nq, batch_size)
    for s in tqdm(starts, desc=f"knn k={k}", unit="batch", disable=not progress or len(starts) <= 1):
        d_b, i_b = index.search(xq[s : s + batch_size], k_search)
        if self_search:
            d_b, i_b = _drop_self(d_b, i_b, s, k)
        sims[s : s + len(i_b)] = d_b
        ids[s : s + len(i_b)] = i_b
    search_s = time.perf_counter() - t1
    sims[ids < 0] = -np.inf  # faiss pads missing neighbours with id -1 and an arbitrary distance
    return KnnResult(sims, ids, "ivf" if is_ivf else "flat", build_s, search_s, params)
