"""The `retrieve` stage: curate the clean pool by similarity to a curated seed set (LVD-142M, paper §3).

Sample-based retrieval (the k nearest pool images of every seed image) for large seed sets; cluster-based
retrieval (k-means on the pool, keep clusters that hold seed images, sample from them) for small ones; with an
empty seed set, balanced sampling over hierarchical k-means of the pool (seedless curation). The
embedder is a parameter: the model-free descriptor in the bootstrap round, then the project's own exported
teacher (use the model to curate data, and the curated data to train a better model).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from dinov2_core.curation import balanced_sampling, cluster_based_retrieval, sample_based_retrieval
from tasks.backbones import make_embedder
from tasks.curation_scores import load_truth, retrieval_quality
from tasks.dedup import embedding_checks
from tasks.embed_job import parallel_embedder
from tasks.embeddings import embed_keys, load_embeddings
from tasks.image_store import ImageStore, load_indexed_images, open_rgb
from tasks.log import get_logger
from tasks.params import Params, params_record
from tasks.reports import write_metrics, write_parquet
from tasks.storage import Storage
from tasks.validation import TableCheck, validate_stage

log = get_logger("retrieve")

COLUMNS = ["sha256", "seed_neighbour", "similarity", "cluster", "method"]


def choose_mode(mode: str, n_seeds: int, large_seed_set: int) -> str:
    """Paper §3: sample-based for large seed sets, cluster-based for small ones, balanced for none; `mode` forces
    one (a seed-based mode with no seeds is a params error)."""
    if mode in ("sample", "cluster") and n_seeds == 0:
        raise ValueError(f"retrieve.mode={mode} needs seed images; the seed set is empty (use mode auto or balanced)")
    if mode != "auto":
        return mode
    if n_seeds == 0:
        return "balanced"
    return "sample" if n_seeds >= large_seed_set else "cluster"


def run_retrieve(params: Params) -> pd.DataFrame:
    p = params.retrieve
    storage = Storage.from_params(params.storage)
    store = ImageStore(p.images)
    decontam = pd.read_parquet(Path(p.pool) / "decontam.parquet")
    pool_keys = decontam.loc[decontam["kept"], "key"].tolist()
    seed_ids, seed_paths = load_indexed_images(p.seed_index, p.seed_path_column, p.seed_id_column,
                                               "seed set index (retrieve.seed_index)")
    by_id = dict(zip(seed_ids, seed_paths))
    embedder = make_embedder(p.embedder, storage)

    start = time.perf_counter()
    dedup_emb = Path(params.decontaminate.dedup) / "embeddings.npz"
    pool_stats = None
    reused_from_dedup = False
    if dedup_emb.exists():
        keys, vectors, emb_id = load_embeddings(dedup_emb)
        if emb_id == embedder.id:  # same embedder as dedup: its pool embeddings are reused as they are
            index = {k: i for i, k in enumerate(keys)}
            pool_vectors = vectors[[index[k] for k in pool_keys]]
            reused_from_dedup = True
    if not reused_from_dedup:
        pool_vectors, pool_stats = embed_keys(pool_keys, store.load, embedder, p.cache_dir, desc="pool embed",
                                              parallel=parallel_embedder(p.embedder, p.images, params.storage,
                                                                         p.cache_dir, embedder.id))
    mode = choose_mode(p.mode, len(seed_ids), p.large_seed_set)
    checks = [embedding_checks("pool_embeddings", pool_vectors, embedder.dim)]
    seed_stats = None
    if mode != "balanced":
        seed_vectors, seed_stats = embed_keys(seed_ids, lambda i: open_rgb(by_id[i]), embedder, p.cache_dir,
                                              desc="seed embed")
        checks.append(embedding_checks("seed_embeddings", seed_vectors, embedder.dim))
    embed_seconds = time.perf_counter() - start
    validate_stage("retrieve-input", checks, params.reports)

    start = time.perf_counter()
    if mode == "balanced":
        result, algo = balanced_sampling(pool_vectors, pool_keys, n_clusters=min(p.n_clusters, len(pool_keys)),
                                         target=max(1, round(p.balanced_fraction * len(pool_keys))), seed=p.seed)
    elif mode == "sample":
        result, algo = sample_based_retrieval(pool_vectors, pool_keys, seed_vectors, seed_ids, k=p.k)
    else:
        result, algo = cluster_based_retrieval(pool_vectors, pool_keys, seed_vectors, seed_ids,
                                               n_clusters=min(p.n_clusters, len(pool_keys)),
                                               per_cluster=p.per_cluster, seed=p.seed)
    retrieve_seconds = time.perf_counter() - start
    curated = result.rename(columns={"key": "sha256"})[COLUMNS].sort_values("sha256").reset_index(drop=True)

    validate_stage("retrieve", _checks(curated, pool_keys), params.reports)
    out = Path(p.out)
    write_parquet(out / "curated.parquet", curated)

    metrics = {
        "pool": len(pool_keys),
        "seeds": len(seed_ids),
        "curated": len(curated),
        "mode": mode,
        "embedder": embedder.record,
        "pool_embeddings_reused_from_dedup": reused_from_dedup,
        "pool_embedding": pool_stats.as_dict() if pool_stats else None,
        "seed_embedding": seed_stats.as_dict() if seed_stats else None,
        "embed_seconds": round(embed_seconds, 3),
        "retrieve_seconds": round(retrieve_seconds, 3),
        "clusters_used": int(curated["cluster"].nunique()) if mode in ("cluster", "balanced") else None,
        "algo": {k: v for k, v in algo.items() if isinstance(v, (int, float, str, bool))},
        "params": params_record(p),
    }
    truth = load_truth(p.ground_truth, store.manifest)
    if truth is not None:
        metrics["quality"] = retrieval_quality(pool_keys, curated["sha256"].tolist(), truth)
    write_metrics(params.reports, "retrieve", metrics)
    q = metrics.get("quality", {})
    log.info("retrieve (%s): %d of %d pool images curated from %d seeds; in-domain share %s -> %s",
             mode, len(curated), len(pool_keys), len(seed_ids), q.get("pool_in_domain_share"),
             q.get("curated_in_domain_share"))
    return curated


def _checks(curated: pd.DataFrame, pool_keys: list[str]) -> list[TableCheck]:
    import great_expectations.expectations as gxe

    return [TableCheck("curated", curated, [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, max_value=len(pool_keys)),
        gxe.ExpectColumnValuesToBeUnique(column="sha256"),
        gxe.ExpectColumnValuesToBeInSet(column="sha256", value_set=sorted(pool_keys)),
        gxe.ExpectColumnValuesToBeBetween(column="similarity", min_value=-1.0001, max_value=1.0001),
        gxe.ExpectColumnValuesToBeInSet(column="method", value_set=["sample", "cluster", "balanced"]),
    ])]
