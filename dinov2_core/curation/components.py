"""Connected components of a similarity graph (paper App. A: duplicates are whole components, not pairs).

Union-find is done array-wise (hook the larger root under the smaller, then pointer-jump to full
compression, repeat) so millions of kNN edges do not need a Python loop. Because roots only ever point to
smaller indices, every root is the smallest member of its component, which gives deterministic ids:
components are numbered 0..C-1 in order of their smallest member.
"""

from __future__ import annotations

import numpy as np

__all__ = ["component_sizes", "components_from_knn", "connected_components", "knn_edges"]


def _compress(parent: np.ndarray) -> np.ndarray:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def connected_components(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Component id (int64 [n]) of every node given undirected edges ``src[i] -- dst[i]``."""
    src = np.asarray(src, dtype=np.int64).ravel()
    dst = np.asarray(dst, dtype=np.int64).ravel()
    if src.shape != dst.shape:
        raise ValueError("src and dst must have the same length")
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        raise ValueError(f"edge endpoints must be in [0, {n})")
    parent = np.arange(n, dtype=np.int64)
    while src.size:
        ru, rv = parent[src], parent[dst]
        live = ru != rv
        if not live.any():
            break
        src, dst, ru, rv = src[live], dst[live], ru[live], rv[live]  # settled edges never matter again
        lo, hi = np.minimum(ru, rv), np.maximum(ru, rv)
        np.minimum.at(parent, hi, lo)  # hook: a root may take several candidates, the smallest wins
        parent = _compress(parent)
    roots = _compress(parent)
    _, labels = np.unique(roots, return_inverse=True)  # roots are component minima -> ordered ids
    return labels.astype(np.int64)


def knn_edges(
    sims: np.ndarray, ids: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges (src, dst, sim) of a kNN graph whose similarity is strictly above ``threshold``.

    The comparison is done in float32 (the dtype of faiss similarities), so a similarity equal to the
    float32 value of the threshold is *not* an edge. Padding (id -1) and self-loops are dropped.
    """
    sims = np.asarray(sims, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    rows = np.broadcast_to(np.arange(ids.shape[0], dtype=np.int64)[:, None], ids.shape)
    keep = (sims > np.float32(threshold)) & (ids >= 0) & (ids != rows)
    return rows[keep], ids[keep], sims[keep]


def components_from_knn(sims: np.ndarray, ids: np.ndarray, threshold: float) -> np.ndarray:
    """Component ids of the thresholded kNN graph (rows of ``ids`` are the nodes 0..n-1)."""
    src, dst, _ = knn_edges(sims, ids, threshold)
    return connected_components(ids.shape[0], src, dst)


def component_sizes(labels: np.ndarray) -> np.ndarray:
    """Size of the component of every node (same shape as ``labels``)."""
    labels = np.asarray(labels)
    return np.bincount(labels)[labels] if labels.size else np.zeros(0, dtype=np.int64)
