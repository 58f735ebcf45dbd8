"""The `dedup` stage: near-duplicate removal over the ingest store (paper §3 and App. A).

Copy-detection embeddings -> faiss kNN graph (k=64) -> edges above the cosine threshold -> connected
components -> one image kept per component (largest resolution, then lowest sha256). Exact byte duplicates
were already collapsed by ingest; this stage catches resized, re-encoded, cropped and flipped copies.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from dinov2_core.curation import PairVerifier, deduplicate, knn_search
from tasks.backbones import copy_detection_views_embedder, make_embedder, views_array
from tasks.curation_scores import dedup_quality, grey_pixel_ncc, load_truth
from tasks.embed_job import parallel_embedder
from tasks.embeddings import embed_keys, save_embeddings
from tasks.image_store import ImageStore
from tasks.log import get_logger
from tasks.params import Params, params_record
from tasks.reports import write_metrics, write_parquet
from tasks.storage import Storage
from tasks.validation import TableCheck, validate_stage

log = get_logger("dedup")

DEDUP_COLUMNS = ["key", "component", "component_size", "kept", "duplicate_of", "similarity"]


def embedding_checks(name: str, vectors: np.ndarray, dim: int) -> TableCheck:
    """Embeddings are finite, of the expected dimension, and unit-norm (cosine = inner product downstream)."""
    import great_expectations.expectations as gxe

    frame = pd.DataFrame({
        "norm": np.linalg.norm(vectors, axis=1) if len(vectors) else np.zeros(0),
        "finite": np.isfinite(vectors).all(axis=1) if len(vectors) else np.zeros(0, bool),
        "dim": np.full(len(vectors), vectors.shape[1] if vectors.ndim == 2 else -1),
    })
    return TableCheck(name, frame, [
        gxe.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
        gxe.ExpectColumnValuesToBeBetween(column="norm", min_value=0.99, max_value=1.01),
        gxe.ExpectColumnValuesToBeInSet(column="dim", value_set=[dim]),
    ])


def max_similarity_between(vectors: np.ndarray, sample: np.ndarray, k: int = 2) -> np.ndarray:
    """For sampled rows, the highest cosine to any *other* row of `vectors` (self excluded)."""
    if len(vectors) < 2 or len(sample) == 0:
        return np.zeros(len(sample), dtype=np.float32)
    res = knn_search(vectors, vectors[sample], k=k)
    sims, ids = res.sims, res.ids
    other = ids != sample[:, None]
    return np.where(other, sims, -np.inf).max(axis=1)


def run_dedup(params: Params) -> pd.DataFrame:
    p = params.dedup
    storage = Storage.from_params(params.storage)
    store = ImageStore(p.images)
    keys = store.manifest["sha256"].tolist()
    embedder = make_embedder(p.embedder, storage)

    start = time.perf_counter()
    vectors, emb_stats = embed_keys(keys, store.load, embedder, p.cache_dir, desc="dedup embed",
                                    parallel=parallel_embedder(p.embedder, p.images, params.storage, p.cache_dir,
                                                               embedder.id))
    views = None
    views_stats = None
    if p.crop_views and p.embedder.kind == "copy-detection":
        view_embedder = copy_detection_views_embedder()
        flat, views_stats = embed_keys(keys, store.load, view_embedder, p.cache_dir, desc="dedup views",
                                       parallel=parallel_embedder(p.embedder, p.images, params.storage, p.cache_dir,
                                                                  view_embedder.id, views=True))
        views = views_array(flat, embedder.dim)
    embed_seconds = time.perf_counter() - start

    verifier = None
    if p.verify:
        sizes = store.manifest.loc[keys, ["width", "height"]].to_numpy()
        verifier = PairVerifier(lambda i: store.load(keys[i]), min_inliers=p.verify_min_inliers,
                                min_ncc=p.verify_min_ncc, min_dense=p.verify_min_dense, sizes=sizes)
    start = time.perf_counter()
    result, algo_metrics = deduplicate(vectors, keys, store.resolution(keys), k=p.k, threshold=p.threshold,
                                       views=views, verifier=verifier, verify_k=p.verify_k,
                                       exact_threshold=p.exact_search_max, nlist=p.nlist, nprobe=p.nprobe,
                                       factory=p.index_factory, shards=p.index_shards,
                                       recall_sample=p.check_sample)
    graph_seconds = time.perf_counter() - start
    result = result[DEDUP_COLUMNS].reset_index(drop=True)

    kept_idx = np.flatnonzero(result["kept"].to_numpy())
    rng = np.random.default_rng(params.seed)
    sample = rng.choice(len(kept_idx), size=min(p.check_sample, len(kept_idx)), replace=False)
    kept_vectors = vectors[kept_idx]
    neighbour = max_similarity_between(kept_vectors, np.sort(sample)) if len(kept_idx) > 1 else np.zeros(0)
    validate_stage("dedup", _checks(result, len(keys), vectors, embedder.dim, neighbour, p.threshold),
                   params.reports)

    out = Path(p.out)
    write_parquet(out / "dedup.parquet", result)
    save_embeddings(out / "embeddings.npz", keys, vectors, embedder.id)

    metrics = {
        "images": len(keys),
        "kept": int(result["kept"].sum()),
        "removed": int((~result["kept"]).sum()),
        "components": int(result["component"].nunique()),
        "largest_component": int(result["component_size"].max()) if len(result) else 0,
        "embedder": embedder.record,
        "embedding": emb_stats.as_dict(),
        "crop_views": views_stats.as_dict() if views_stats else None,
        "embed_seconds": round(embed_seconds, 3),
        "graph_seconds": round(graph_seconds, 3),
        "knn": {k: v for k, v in algo_metrics.items() if isinstance(v, (int, float, str, bool))},
        "verification": {k: algo_metrics[k] for k in algo_metrics if k.startswith(("n_candidate", "n_verified",
                         "n_added", "verify"))} | (
                         {"images_described": verifier.n_images_described,
                          "n_dense_checked": verifier.n_dense_checked,
                          "n_dense_copies": verifier.n_dense_copies} if verifier else {}),
        "params": params_record(p),
    }
    truth = load_truth(p.ground_truth, store.manifest)
    if truth is not None:
        metrics["quality"] = dedup_quality(result, truth, lambda a, b: grey_pixel_ncc(store.load(a), store.load(b)))
    write_metrics(params.reports, "dedup", metrics)
    q = metrics.get("quality", {})
    log.info("dedup: %d images -> %d kept, %d near-duplicates removed (recall %s, precision %s vs ground truth; "
             "%s counting the crawl's own pixel copies)", metrics["images"], metrics["kept"], metrics["removed"],
             q.get("recall"), q.get("precision"), q.get("precision_pixel_copies_counted"))
    return result


def _checks(result: pd.DataFrame, n_in: int, vectors: np.ndarray, dim: int, neighbour: np.ndarray,
            threshold: float) -> list[TableCheck]:
    import great_expectations.expectations as gxe

    kept_keys = sorted(result.loc[result["kept"], "key"])
    removed = result[~result["kept"]]
    return [
        TableCheck("dedup", result, [
            gxe.ExpectTableRowCountToEqual(value=n_in),  # in = kept + removed, each image once
            gxe.ExpectColumnValuesToBeUnique(column="key"),
            gxe.ExpectColumnValuesToNotBeNull(column="component"),
        ]),
        TableCheck("removed", removed, [
            gxe.ExpectColumnValuesToBeInSet(column="duplicate_of", value_set=kept_keys),
        ]),
        embedding_checks("embeddings", vectors, dim),
        # no two kept images above the threshold (re-searched on a sample of the kept set)
        TableCheck("kept_sample", pd.DataFrame({"max_similarity_to_other_kept": neighbour}), [
            gxe.ExpectColumnValuesToBeBetween(column="max_similarity_to_other_kept", min_value=-1.0,
                                              max_value=float(threshold) + 1e-6),
        ]),
    ]
