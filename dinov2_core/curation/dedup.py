"""Near-duplicate removal (paper §3 "Deduplication" and App. A.2).

The paper builds a k-NN graph (k=64) of copy-detection embeddings, keeps edges with cosine similarity
above a threshold (0.6 for SSCD), and keeps one image per connected component. Our descriptor is not SSCD,
so the threshold is the caller's (the pipeline's params state and justify its default; measured by
``benchmarks/copy_detection.py``). With a ``verifier`` (:class:`~dinov2_core.curation.verify.PairVerifier`),
the graph is built in two stages: every image's ``verify_k`` nearest neighbours are candidates whatever
their similarity (a copy's source ranks high even when the global descriptor moved a lot), and a candidate
pair becomes an edge when local features verify it. Edges above the descriptor threshold stay edges:
verification only adds the copies the descriptor misses (local features fail on thumbnails and on plain,
heavily re-encoded photos, where the descriptor is the better judge).

Representative rule (deterministic, independent of input order): largest resolution (width*height, or any
"bigger is better" score), then lowest key (e.g. the sha256 of the bytes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .components import component_sizes, connected_components, knn_edges
from .knn import DEFAULT_EXACT_THRESHOLD, KnnResult, build_index, knn_search
from .result import CurationResult

__all__ = [
    "DEDUP_K",
    "VERIFY_K",
    "VIEW_K",
    "deduplicate",
    "pick_representatives",
    "verified_edges",
    "view_edges",
]

DEDUP_K = 64  # paper App. A: 64 nearest neighbours per image
VIEW_K = 8  # neighbours per extra view (only near-exact view matches matter)
VERIFY_K = 8  # candidate neighbours per image for verification (a copy's source ranks <= 3 for 98 % of copies)


def _unique_pairs(src: np.ndarray, dst: np.ndarray, sim: np.ndarray, n: int):
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    key = lo * n + hi
    order = np.lexsort((-sim, key))
    key, lo, hi, sim = key[order], lo[order], hi[order], sim[order]
    first = np.ones(key.size, dtype=bool)
    first[1:] = key[1:] != key[:-1]
    return lo[first], hi[first], sim[first]


def verified_edges(
    src: np.ndarray, dst: np.ndarray, sim: np.ndarray, threshold: float, verifier, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Candidate pairs that ``verifier`` calls copies (verdict 1) or whose similarity is above ``threshold``
    (whatever the verdict: local features miss copies of plain photos). Returns edges and counts."""

    src, dst, sim = _unique_pairs(src, dst, sim, n)
    start = time.perf_counter()
    verdict, _ = verifier(src, dst)
    seconds = time.perf_counter() - start
    verdict = np.asarray(verdict)
    above = sim > np.float32(threshold)
    keep = (verdict == 1) | above
    stats = {
        "n_candidate_pairs": int(src.size),
        "n_verified_pairs": int((verdict != 0).sum()),
        "n_verified_copies": int((verdict == 1).sum()),
        "n_verified_rejected": int((verdict == -1).sum()),
        "n_verified_rejected_above_threshold": int(((verdict == -1) & above).sum()),  # kept: descriptor wins
        "n_added_below_threshold": int(((verdict == 1) & ~above).sum()),
        "verify_s": round(seconds, 3),
    }
    return src[keep], dst[keep], sim[keep], stats


def view_edges(
    embeddings: np.ndarray, views: np.ndarray, threshold: float, *, k: int = VIEW_K, index=None, **knn_kwargs
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Edges (image, other image, similarity) where a view of the first (e.g. a centre crop, from
    :func:`~dinov2_core.curation.embed.copy_detection_views`) matches the full descriptor of the second
    above ``threshold``. Also returns the search time in seconds."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    views = np.asarray(views, dtype=np.float32)
    if views.ndim != 3 or views.shape[1:] != emb.shape:
        raise ValueError(f"views must be [V, {emb.shape[0]}, {emb.shape[1]}], got {views.shape}")
    if index is None:
        index = build_index(emb, **knn_kwargs)
    src, dst, sim, seconds = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)], 0.0
    for v in views:
        res = knn_search(emb, v, k=min(k, len(emb)), index=index)
        seconds += res.search_seconds
        a, b, c = knn_edges(res.sims, res.ids, threshold)  # also drops view(i) -> i
        src.append(a)
        dst.append(b)
        sim.append(c)
    return np.concatenate(src), np.concatenate(dst), np.concatenate(sim), seconds


def _check_keys(keys: Sequence[str], n: int) -> np.ndarray:
    keys = np.asarray(keys, dtype=object)
    if keys.shape != (n,):
        raise ValueError(f"expected {n} keys, got shape {keys.shape}")
    if len(pd.unique(keys)) != n:
        raise ValueError("keys must be unique")
    return keys


def pick_representatives(
    labels: np.ndarray, keys: Sequence[str], resolution: np.ndarray | None = None
) -> np.ndarray:
    """Index of the kept member of every node's component: max ``resolution``, then min key."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    res = np.zeros(n) if resolution is None else np.asarray(resolution, dtype=np.float64)
    key_rank = np.empty(n, dtype=np.int64)
    key_rank[np.argsort(np.asarray(keys, dtype=object).astype(str), kind="stable")] = np.arange(n)
    order = np.lexsort((key_rank, -res, labels))  # by component, then best first
    first = np.ones(n, dtype=bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    rep_of_label = np.empty(labels.max() + 1 if n else 0, dtype=np.int64)
    rep_of_label[labels[order][first]] = order[first]
    return rep_of_label[labels]


def deduplicate(
    embeddings: np.ndarray,
    keys: Sequence[str],
    resolution: np.ndarray | None = None,
    *,
    threshold: float,
    k: int = DEDUP_K,
    views: np.ndarray | None = None,
    view_k: int = VIEW_K,
    verifier=None,
    verify_k: int = VERIFY_K,
    knn: KnnResult | None = None,
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    nlist: int | None = None,
    nprobe: int = 32,
    factory: str | None = None,
    shards: int = 1,
    recall_sample: int = 0,
    progress: bool = False,
) -> CurationResult:
    """One row per image: key, component, component_size, kept, duplicate_of, similarity.

    ``similarity`` is the cosine to the kept representative for removed images, and the strongest graph
    edge (> threshold) for kept ones (NaN for singletons). Returns ``CurationResult(frame, metrics)``;
    ``metrics`` has counts and kNN speed. A precomputed self-search ``knn`` (from :func:`knn_search`) can
    be passed to reuse the graph.

    ``views`` ([V, N, D], e.g. :func:`~dinov2_core.curation.embed.copy_detection_views`) add edges from a
    view of one image to the full descriptor of another -- our addition to the paper's single-embedding
    graph, because our descriptor (unlike SSCD) is not crop invariant.

    ``verifier`` (e.g. :class:`~dinov2_core.curation.verify.PairVerifier` over the same images, called with
    index arrays) turns on the two-stage graph described in the module docstring.
    """
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = emb.shape[0]
    keys = _check_keys(keys, n)
    if resolution is not None and np.asarray(resolution).shape != (n,):
        raise ValueError("resolution must have one value per embedding")
    if n == 0:
        df = pd.DataFrame(
            {
                "key": [],
                "component": [],
                "component_size": [],
                "kept": [],
                "duplicate_of": [],
                "similarity": [],
            }
        )
        return CurationResult(df, {"n_images": 0, "n_components": 0, "n_removed": 0})
    index = None
    if (knn is None or views is not None) and n > 1:
        index = build_index(emb, exact_threshold=exact_threshold, nlist=nlist, nprobe=nprobe, factory=factory,
                            shards=shards)
    if knn is None and n > 1:
        knn = knn_search(emb, k=min(k, n - 1), index=index, progress=progress, recall_sample=recall_sample)
    if knn is not None:
        src, dst, sim = knn_edges(knn.sims, knn.ids, threshold)
    else:
        src = dst = np.zeros(0, dtype=np.int64)
        sim = np.zeros(0, dtype=np.float32)
    n_view_edges, view_s = 0, 0.0
    if views is not None and n > 1:
        vs, vd, vsim, view_s = view_edges(emb, views, threshold, k=view_k, index=index)
        n_view_edges = int(vs.size)
        src, dst, sim = np.concatenate([src, vs]), np.concatenate([dst, vd]), np.concatenate([sim, vsim])
    verify_stats: dict = {}
    if verifier is not None and knn is not None:
        cols = min(verify_k + 1, knn.ids.shape[1])  # + 1: the image itself is usually its first neighbour
        cs, cd, csim = knn_edges(knn.sims[:, :cols], knn.ids[:, :cols], -np.inf)
        src, dst, sim = np.concatenate([src, cs]), np.concatenate([dst, cd]), np.concatenate([sim, csim])
        src, dst, sim, verify_stats = verified_edges(src, dst, sim, threshold, verifier, n)
    labels = connected_components(n, src, dst)
    rep = pick_representatives(labels, keys, resolution)
    kept = rep == np.arange(n)

    best_edge = np.full(n, -np.inf, dtype=np.float32)
    np.maximum.at(best_edge, src, sim)
    np.maximum.at(best_edge, dst, sim)
    sim_to_rep = np.einsum("ij,ij->i", emb, emb[rep])
    similarity = np.where(kept, best_edge, sim_to_rep).astype(np.float64)
    similarity[np.isneginf(similarity)] = np.nan

    df = pd.DataFrame(
        {
            "key": keys,
            "component": labels,
            "component_size": component_sizes(labels),
            "kept": kept,
            "duplicate_of": pd.Series(np.where(kept, None, keys[rep]), dtype=object),  # None, not NaN
            "similarity": similarity,
        }
    )
    metrics = {
        "n_images": int(n),
        "n_components": int(labels.max() + 1),
        "n_removed": int((~kept).sum()),
        "removed_fraction": float((~kept).mean()),
        "largest_component": int(df["component_size"].max()),
        "n_edges": int(src.size),
        "n_view_edges": n_view_edges,
        "n_views": 0 if views is None else len(views),
        "view_search_s": round(view_s, 4),
        "threshold": float(threshold),
        "k": int(k),
        "verify": verifier is not None,
        **({"verify_k": int(verify_k), **verify_stats} if verifier is not None else {}),
        **(knn.metrics() if knn is not None else {}),
    }
    return CurationResult(df, metrics)
