"""The `decontaminate` stage: no image that copies an evaluation image may reach training (paper §3).

The pool's copy-detection embeddings come from `dedup` (same embedder, reused, not recomputed); the eval
images are embedded here (with centre-crop views, since our descriptor is not crop invariant). A pool image
above the threshold to any eval image is removed together with its whole dedup component.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dinov2_core.curation import PairVerifier, decontaminate, knn_search
from tasks.backbones import copy_detection_views_embedder, make_embedder, views_array
from tasks.curation_scores import decontamination_quality, grey_pixel_ncc, load_truth
from tasks.dedup import embedding_checks
from tasks.embeddings import embed_keys, load_embeddings
from tasks.image_store import ImageStore, load_indexed_images, open_rgb
from tasks.log import get_logger
from tasks.params import Params, params_record
from tasks.reports import write_metrics, write_parquet
from tasks.storage import Storage
from tasks.validation import TableCheck, validate_stage

log = get_logger("decontaminate")

COLUMNS = ["key", "component", "dedup_kept", "removed", "reason", "matched_eval_id", "similarity", "kept"]


def run_decontaminate(params: Params) -> pd.DataFrame:
    p = params.decontaminate
    storage = Storage.from_params(params.storage)
    store = ImageStore(p.images)
    dedup_dir = Path(p.dedup)
    dedup = pd.read_parquet(dedup_dir / "dedup.parquet")
    pool_keys, pool_vectors, pool_embedder_id = load_embeddings(dedup_dir / "embeddings.npz")
    embedder = make_embedder(params.dedup.embedder, storage)
    if embedder.id != pool_embedder_id:
        raise ValueError(f"dedup embeddings were made by {pool_embedder_id}, but the dedup embedder is now "
                         f"{embedder.id}: rerun dedup")
    dedup = dedup.set_index("key").loc[pool_keys].reset_index()
    validate_stage("decontaminate-input", [embedding_checks("pool_embeddings", pool_vectors, embedder.dim)],
                   params.reports)

    eval_ids: list[str] = []
    eval_paths: list[Path] = []
    for ref in p.eval_sets:
        ids, paths = load_indexed_images(ref.index, ref.path_column, ref.id_column,
                                         "evaluation set index (decontaminate.eval_sets)")
        eval_ids += ids
        eval_paths += paths
    by_id = dict(zip(eval_ids, eval_paths))
    start = time.perf_counter()
    eval_vectors, eval_stats = embed_keys(eval_ids, lambda i: open_rgb(by_id[i]), embedder, p.cache_dir,
                                          desc="eval embed")
    eval_views = None
    if p.crop_views and params.dedup.embedder.kind == "copy-detection":
        flat, _ = embed_keys(eval_ids, lambda i: open_rgb(by_id[i]), copy_detection_views_embedder(),
                             p.cache_dir, desc="eval views")
        eval_views = views_array(flat, embedder.dim)
    embed_seconds = time.perf_counter() - start

    verifier = None
    if p.verify:  # pool images 0..n-1, then eval images n..n+m-1, with dedup's verification settings
        n, d = len(pool_keys), params.dedup
        eval_sizes = []
        for i in eval_ids:
            with Image.open(by_id[i]) as im:
                eval_sizes.append(im.size)
        sizes = np.vstack([store.manifest.loc[pool_keys, ["width", "height"]].to_numpy(),
                           np.asarray(eval_sizes, dtype=np.int64).reshape(-1, 2)])
        verifier = PairVerifier(lambda i: store.load(pool_keys[i]) if i < n else open_rgb(by_id[eval_ids[i - n]]),
                                min_inliers=d.verify_min_inliers, min_ncc=d.verify_min_ncc,
                                min_dense=d.verify_min_dense, sizes=sizes)
    start = time.perf_counter()
    result, algo = decontaminate(pool_vectors, pool_keys, eval_vectors, eval_ids,
                                 components=dedup["component"].to_numpy(), eval_views=eval_views,
                                 threshold=p.threshold, k=p.k, verifier=verifier,
                                 verify_k=params.dedup.verify_k)
    search_seconds = time.perf_counter() - start
    result = result.assign(dedup_kept=dedup["kept"].to_numpy())
    result["kept"] = result["dedup_kept"] & ~result["removed"]
    result = result[COLUMNS].reset_index(drop=True)

    kept_mask = result["kept"].to_numpy()
    nearest = np.zeros(0, dtype=np.float32)
    if kept_mask.any() and len(eval_vectors):
        nearest = knn_search(eval_vectors, pool_vectors[kept_mask], k=1).sims[:, 0]
    validate_stage("decontaminate", _checks(result, len(pool_keys), nearest, p.threshold, eval_vectors,
                                            embedder.dim), params.reports)
    out = Path(p.out)
    write_parquet(out / "decontam.parquet", result)

    metrics = {
        "pool_images": len(pool_keys),
        "dedup_kept": int(result["dedup_kept"].sum()),
        "removed": int(result["removed"].sum()),
        "removed_direct": int((result["reason"] == "direct").sum()),
        "removed_with_component": int((result["reason"] == "component").sum()),
        "kept": int(result["kept"].sum()),
        "eval_images": len(eval_ids),
        "eval_sets": [ref.index for ref in p.eval_sets],
        "embedder": embedder.record,
        "eval_embedding": eval_stats.as_dict(),
        "embed_seconds": round(embed_seconds, 3),
        "search_seconds": round(search_seconds, 3),
        "knn": {k: v for k, v in algo.items() if isinstance(v, (int, float, str, bool))},
        "params": params_record(p),
    }
    truth = load_truth(p.ground_truth, store.manifest)
    if truth is not None:
        metrics["quality"] = decontamination_quality(
            result, truth, lambda key, eval_id: grey_pixel_ncc(store.load(key), open_rgb(by_id[eval_id])))
    write_metrics(params.reports, "decontaminate", metrics)
    q = metrics.get("quality", {})
    log.info("decontaminate: %d removed (%d direct), %d kept; planted eval copies removed %s/%s",
             metrics["removed"], metrics["removed_direct"], metrics["kept"],
             q.get("planted_eval_copies_removed"), q.get("planted_eval_copies_in_pool"))
    return result


def _checks(result: pd.DataFrame, n_in: int, nearest: np.ndarray, threshold: float, eval_vectors: np.ndarray,
            dim: int) -> list[TableCheck]:
    import great_expectations.expectations as gxe

    removed = result[result["removed"]]
    return [
        TableCheck("decontam", result, [
            gxe.ExpectTableRowCountToEqual(value=n_in),
            gxe.ExpectColumnValuesToBeUnique(column="key"),
        ]),
        TableCheck("removed", removed, [
            gxe.ExpectColumnValuesToNotBeNull(column="matched_eval_id"),
            gxe.ExpectColumnValuesToBeInSet(column="reason", value_set=["direct", "component"]),
        ]),
        embedding_checks("eval_embeddings", eval_vectors, dim),
        # no kept image within the decontamination threshold of any eval image
        TableCheck("kept_vs_eval", pd.DataFrame({"max_similarity_to_eval": nearest}), [
            gxe.ExpectColumnValuesToBeBetween(column="max_similarity_to_eval", min_value=-1.0,
                                              max_value=float(threshold) + 1e-6),
        ]),
    ]
