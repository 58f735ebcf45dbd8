"""Cosine k-nearest-neighbour search with faiss (paper §3 and App. A: every curation step is a kNN query).

Vectors are expected to be L2-normalised, so inner product == cosine similarity. Below ``exact_threshold``
database vectors an exact ``IndexFlatIP`` is used; above it an ``IndexIVFFlat`` (inner-product metric), whose
recall is governed by ``nlist`` / ``nprobe``. For billion-scale pools a ``factory`` string builds any faiss index
(e.g. ``IVF{nlist},PQ32``: IVF-PQ, trained on a sample and filled in slices), ``shards`` splits the database over
several indexes searched together (``IndexShards``: the same top-k as one index), and the index moves to every
GPU when faiss-gpu sees one. ``recall_sample`` measures an approximate index's recall@k against exact search on a
sample of the queries. Compressed indexes (PQ) return candidates whose similarities are then computed exactly
from the vectors, so thresholds mean the same whatever the index. Results are plain arrays so callers decide what
to store.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
from tqdm.auto import tqdm

__all__ = ["DEFAULT_EXACT_THRESHOLD", "KnnResult", "build_index", "default_nlist", "describe_index", "knn_search",
           "recall_at_k"]

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
    index_type: str  # "flat", "ivf", "ivfpq", ... (describe_index)
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
    factory: str | None = None,
    shards: int = 1,
    add_batch: int = 65_536,
    use_gpu: bool = True,
) -> faiss.Index:
    """Exact flat IP index for small pools, IVF-Flat (IP) above ``exact_threshold`` vectors, or ``factory``
    (``{nlist}`` is filled in) at any size; ``shards`` > 1 splits the rows into that many such indexes."""
    xb = _as_matrix(xb, "xb")
    n, d = xb.shape
    if shards > 1:
        shard_index = faiss.IndexShards(d, True, True)  # threaded; ids continue from shard to shard
        parts = [build_index(xb[rows], exact_threshold=exact_threshold, nlist=nlist, nprobe=nprobe,
                             max_train_points=max_train_points, seed=seed, factory=factory, add_batch=add_batch,
                             use_gpu=use_gpu) for rows in np.array_split(np.arange(n), shards)]
        for part in parts:
            shard_index.add_shard(part)  # faiss's Python layer keeps each shard referenced by the container
        return shard_index
    if factory is None and n <= exact_threshold:
        index = faiss.IndexFlatIP(d)
        index.add(xb)
        return _to_gpus(index, use_gpu)
    nlist = nlist or default_nlist(n)
    if factory is None:
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.index_factory(d, factory.format(nlist=nlist), faiss.METRIC_INNER_PRODUCT)
        coded = faiss.downcast_index(index)  # a view: `index` keeps owning the object
        if hasattr(coded, "do_polysemous_training"):  # codes for Hamming pre-filtering, which search never uses:
            coded.do_polysemous_training = False  # 6x the training time of IVF64,PQ32 on 10k x 64
    ivf = faiss.extract_index_ivf(index) if _is_ivf(index) else None
    if ivf is not None:
        ivf.cp.seed = seed  # deterministic coarse centroids
        ivf.cp.spherical = True  # centroids on the unit sphere, consistent with cosine
    n_train = min(n, max(nlist * 64, min(max_train_points, n)))
    rng = np.random.default_rng(seed)
    train = xb if n_train >= n else xb[np.sort(rng.choice(n, n_train, replace=False))]
    index.train(train)
    for start in range(0, n, add_batch):  # filled in slices: the codes, not a copy of every vector, stay in RAM
        index.add(xb[start:start + add_batch])
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
    return _to_gpus(index, use_gpu)


def _is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except (RuntimeError, ValueError):
        return False


def _to_gpus(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    """faiss-gpu on a machine with GPUs: the index on all of them (sharded); faiss-cpu: unchanged."""
    if use_gpu and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def describe_index(index: faiss.Index) -> tuple[str, dict]:
    """("flat" | "ivf" | "ivfpq" | ..., params) of an index built here, for the run metrics."""
    if isinstance(index, faiss.IndexShards):
        kind, params = describe_index(faiss.downcast_index(index.at(0)))
        return kind, {**params, "shards": int(index.count())}
    if _is_ivf(index):
        ivf = faiss.extract_index_ivf(index)
        coded = type(faiss.downcast_index(index)).__name__
        kind = "ivfpq" if "PQ" in coded else "ivf"
        return kind, {"nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe)}
    return "flat", {}


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of the exact k nearest neighbours that the approximate search also returned."""
    k = exact_ids.shape[1]
    hits = [len(set(a[a >= 0]) & set(e[e >= 0])) for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits) / k) if hits else 1.0


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
    recall_sample: int = 0,
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
    kind, params = describe_index(index)

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
    if kind not in ("flat", "ivf"):  # compressed codes (PQ, SQ): their similarities are estimates, and dedup and
        sims, ids = _rescore(xb, xq, sims, ids)  # retrieval threshold them, so the candidates are scored exactly
    if recall_sample and kind != "flat":
        rows = np.sort(np.random.default_rng(seed).choice(nq, min(recall_sample, nq), replace=False))
        exact = faiss.IndexFlatIP(xb.shape[1])
        exact.add(xb)
        _, e_ids = exact.search(xq[rows], k_search)
        if self_search:
            e_ids = _drop_self_rows(e_ids, rows, k)
        params["recall_at_k"] = round(recall_at_k(ids[rows], e_ids), 4)
        params["recall_queries"] = int(rows.size)
    return KnnResult(sims, ids, kind, build_s, search_s, params)


def _rescore(xb: np.ndarray, xq: np.ndarray, sims: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine of every returned candidate, re-sorted best first (faiss's "refine" step, on the vectors)."""
    valid = ids >= 0
    exact = np.full(sims.shape, -np.inf, dtype=np.float32)
    rows, cols = np.nonzero(valid)
    exact[rows, cols] = np.einsum("ij,ij->i", xq[rows], xb[ids[rows, cols]])
    order = np.argsort(-exact, axis=1, kind="stable")
    return np.take_along_axis(exact, order, 1), np.take_along_axis(ids, order, 1)


def _drop_self_rows(ids: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """``_drop_self`` for queries that are the database rows ``rows`` (not a contiguous block)."""
    drop = ids == rows[:, None]
    drop[~drop.any(axis=1), -1] = True
    return ids[~drop].reshape(-1, k)
