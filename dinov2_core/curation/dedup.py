"""Near-duplicate removal (paper §3 "Deduplication" and App. A.2).

The paper builds a k-NN graph (k=64) of copy-detection embeddings, keeps edges with cosine similarity
above a threshold (0.6 for SSCD), and keeps one image per connected component. Our descriptor is not SSCD,
so the default threshold is the one calibrated in :mod:`dinov2_core.curation.embed`.

Representative rule (deterministic, independent of input order): largest resolution (width*height, or any
"bigger is better" score), then lowest key (e.g. the sha256 of the bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .components import component_sizes, connected_components, knn_edges
from .embed import CD_DEDUP_THRESHOLD
from .knn import DEFAULT_EXACT_THRESHOLD, KnnResult, build_index, knn_search

__all__ = ["DEDUP_K", "VIEW_K", "deduplicate", "pick_representatives", "view_edges"]

DEDUP_K = 64  # paper App. A: 64 nearest neighbours per image
VIEW_K = 8  # neighbours per extra view (only near-exact view matches matter)


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
    k: int = DEDUP_K,
    threshold: float = CD_DEDUP_THRESHOLD,
    views: np.ndarray | None = None,
    view_k: int = VIEW_K,
    knn: KnnResult | None = None,
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    nlist: int | None = None,
    nprobe: int = 32,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per image: key, component, component_size, kept, duplicate_of, similarity.

    ``similarity`` is the cosine to the kept representative for removed images, and the strongest graph
    edge (> threshold) for kept ones (NaN for singletons). ``df.attrs["metrics"]`` has counts and kNN speed.
    A precomputed self-search ``knn`` (from :func:`knn_search`) can be passed to reuse the graph.

    ``views`` ([V, N, D], e.g. :func:`~dinov2_core.curation.embed.copy_detection_views`) add edges from a
    view of one image to the full descriptor of another -- our addition to the paper's single-embedding
    graph, because our descriptor (unlike SSCD) is not crop invariant.
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
        df.attrs["metrics"] = {"n_images": 0, "n_components": 0, "n_removed": 0}
        return df
    index = None
    if (knn is None or views is not None) and n > 1:
        index = build_index(emb, exact_threshold=exact_threshold, nlist=nlist, nprobe=nprobe)
    if knn is None and n > 1:
        knn = knn_search(emb, k=min(k, n - 1), index=index, progress=progress)
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
    df.attrs["metrics"] = {
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
        **(knn.metrics() if knn is not None else {}),
    }
    return df
