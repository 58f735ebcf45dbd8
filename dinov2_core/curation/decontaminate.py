"""Remove pool images that duplicate evaluation images (paper §3 / App. A.2, "relative deduplication").

Each eval image queries its k=64 nearest pool images; pool images above the threshold (paper: 0.45 for
SSCD, lower than the 0.6 used for dedup because leaking a test image into pretraining is worse than
losing a training image) are direct matches, and -- as in the paper -- the whole dedup component of a
match is removed, so a copy of a test image cannot survive through a near-duplicate of itself.

With a ``verifier`` (:class:`~dinov2_core.curation.verify.PairVerifier` over pool images ``0..n-1`` followed
by eval images ``n..n+m-1``), each eval image's ``verify_k`` nearest pool images are also checked with local
features, and verified copies are direct matches whatever their similarity -- the same two-stage rule as
dedup, for the same reason: the global descriptor misses cropped and re-encoded copies of photos.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .knn import DEFAULT_EXACT_THRESHOLD, build_index, knn_search
from .result import CurationResult

__all__ = ["DECONTAM_K", "decontaminate"]

DECONTAM_K = 64  # neighbours retrieved per eval image (same k as dedup, paper App. A)


def decontaminate(
    pool_embeddings: np.ndarray,
    pool_keys: Sequence[str],
    eval_embeddings: np.ndarray,
    eval_ids: Sequence | None = None,
    *,
    components: np.ndarray | None = None,
    threshold: float,
    eval_views: np.ndarray | None = None,
    verifier=None,
    verify_k: int = 8,
    k: int = DECONTAM_K,
    exact_threshold: int = DEFAULT_EXACT_THRESHOLD,
    nlist: int | None = None,
    nprobe: int = 32,
    progress: bool = False,
) -> CurationResult:
    """One row per pool image: key, component, removed, reason, matched_eval_id, similarity; returned as
    ``CurationResult(frame, metrics)`` with counts, the threshold and the kNN search speed in ``metrics``.

    ``components`` (e.g. ``dedup_df["component"]``, aligned with the pool) extends every direct match to
    its component; without it each image is its own component. ``reason`` is "direct" (similarity to an
    eval image > threshold), "component" (a component-mate matched) or None. ``matched_eval_id`` and
    ``similarity`` are the best direct match of the image, or of its component for "component" removals.
    ``eval_views`` ([V, n_eval, D], e.g. centre crops from ``copy_detection_views``) are extra queries, so
    a pool image that is a crop of an eval image is caught although the descriptor is not crop invariant.
    """
    pool = np.ascontiguousarray(pool_embeddings, dtype=np.float32)
    ev = np.ascontiguousarray(eval_embeddings, dtype=np.float32)
    n = pool.shape[0]
    keys = np.asarray(pool_keys, dtype=object)
    if keys.shape != (n,):
        raise ValueError(f"expected {n} pool keys, got shape {keys.shape}")
    eval_ids = np.arange(len(ev)) if eval_ids is None else np.asarray(eval_ids, dtype=object)
    if len(eval_ids) != len(ev):
        raise ValueError("eval_ids must have one entry per eval embedding")
    comp = np.arange(n) if components is None else np.asarray(components, dtype=np.int64)
    if comp.shape != (n,):
        raise ValueError("components must have one entry per pool embedding")

    best_sim = np.full(n, -np.inf, dtype=np.float32)
    best_eval = np.full(n, -1, dtype=np.int64)
    knn_metrics: dict = {}
    verify_stats: dict = {}
    if n and len(ev):
        index = build_index(pool, exact_threshold=exact_threshold, nlist=nlist, nprobe=nprobe)
        queries = [ev] if eval_views is None else [ev, *np.asarray(eval_views, dtype=np.float32)]
        if any(q.shape != ev.shape for q in queries):
            raise ValueError(f"eval_views must be [V, {ev.shape[0]}, {ev.shape[1]}]")
        hits = []
        for qi, q in enumerate(queries):
            knn = knn_search(pool, q, k=min(k, n), index=index, progress=progress)
            knn_metrics = knn_metrics or knn.metrics()  # speed of the main (full-image) search
            rows = np.broadcast_to(np.arange(len(ev))[:, None], knn.ids.shape)
            hit = (knn.sims > np.float32(threshold)) & (knn.ids >= 0)
            hits.append((knn.ids[hit], rows[hit], knn.sims[hit]))
            if qi == 0 and verifier is not None:
                cand = (knn.ids[:, :verify_k] >= 0) & ~hit[:, :verify_k]  # pairs the threshold did not take
                p_c, e_c, s_c = (
                    knn.ids[:, :verify_k][cand],
                    rows[:, :verify_k][cand],
                    knn.sims[:, :verify_k][cand],
                )
                start = time.perf_counter()
                verdict, _ = verifier(p_c, n + e_c)
                copy = np.asarray(verdict) == 1
                hits.append((p_c[copy], e_c[copy], s_c[copy]))
                verify_stats = {
                    "n_candidate_pairs": int(p_c.size),
                    "n_verified_pairs": int((verdict != 0).sum()),
                    "n_added_by_verification": int(copy.sum()),
                    "verify_s": round(time.perf_counter() - start, 3),
                }
        p_idx, e_idx, s = (np.concatenate(h) for h in zip(*hits))
        # best eval match per pool image: sort by (pool, -sim, eval) and take the first of each pool id
        order = np.lexsort((e_idx, -s, p_idx))
        p_idx, e_idx, s = p_idx[order], e_idx[order], s[order]
        first = np.ones(p_idx.size, dtype=bool)
        first[1:] = p_idx[1:] != p_idx[:-1]
        best_sim[p_idx[first]] = s[first]
        best_eval[p_idx[first]] = e_idx[first]

    direct = best_eval >= 0
    # best direct match of each component, propagated to all its members
    comp_best_sim = pd.Series(np.where(direct, best_sim, -np.inf)).groupby(comp).transform("max").to_numpy()
    tagged = direct & (best_sim == comp_best_sim)
    comp_ids, first_idx = np.unique(comp[tagged], return_index=True)  # lowest-index best member per comp
    rep_of_comp = dict(zip(comp_ids.tolist(), np.flatnonzero(tagged)[first_idx].tolist()))
    removed = np.isin(comp, comp_ids)
    via = np.array([rep_of_comp.get(c, -1) for c in comp.tolist()], dtype=np.int64)
    src = np.where(direct, np.arange(n), via)

    matched = np.full(n, None, dtype=object)
    sim_out = np.full(n, np.nan)
    has = src >= 0
    matched[has] = eval_ids[best_eval[src[has]]]
    sim_out[has] = best_sim[src[has]]
    reason = np.where(direct, "direct", np.where(removed, "component", None))

    df = pd.DataFrame(
        {
            "key": keys,
            "component": comp,
            "removed": removed,
            "reason": pd.Series(reason, dtype=object),  # keep None (pandas would turn it into NaN)
            "matched_eval_id": pd.Series(matched, dtype=object),
            "similarity": sim_out,
        }
    )
    metrics = {
        "n_pool": int(n),
        "n_eval": len(ev),
        "n_direct": int(direct.sum()),
        "n_removed": int(removed.sum()),
        "n_eval_matched": len(np.unique(best_eval[direct])),
        "n_eval_views": 0 if eval_views is None else len(eval_views),
        "threshold": float(threshold),
        "k": int(k),
        "verify": verifier is not None,
        **verify_stats,
        **knn_metrics,
    }
    return CurationResult(df, metrics)
