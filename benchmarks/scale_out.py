"""Scale-out mechanisms on this machine: data-parallel embedding (1 vs 2 torchrun ranks, alternating, median of
reps) and IVF-PQ (train on a sample, fill in slices, k=64 search, recall@64 against exact search on a query sample;
one index and 2 shards) on synthetic clustered vectors and on the real embeddings a `make run` cached.

    python -m benchmarks.scale_out [--images 2000] [--reps 3] [--pq-sizes 200000x384,1000000x64]

Writes reports/bench/scale_out.json, which infra/cost_model.py reads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from benchmarks.copy_detection_corpora import natural_tiles
from benchmarks.curation_algos import clustered_vectors
from dinov2_core.curation.knn import build_index, knn_search
from tasks.embed_job import EmbedJob, embed_parallel
from tasks.params import default_params

OUT = Path("reports/bench/scale_out.json")


def _store(root: Path, n: int) -> list[str]:
    """A minimal ingest store (manifest.parquet + images/) of n natural-photo tiles."""
    rows = []
    tiles = natural_tiles(96, stride=48)
    for i in range(n):
        tile = tiles[i % len(tiles)].rotate(90 * (i // len(tiles) % 4))
        buf = io.BytesIO()
        tile.convert("RGB").save(buf, "PNG")
        key = f"{i:064x}"
        path = f"images/{key[:2]}/{key}.png"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(buf.getvalue())
        rows.append({"sha256": key, "path": path, "width": tile.width, "height": tile.height})
    pd.DataFrame(rows).to_parquet(root / "manifest.parquet", index=False)
    return [r["sha256"] for r in rows]


def bench_embedding(n_images: int, reps: int) -> dict:
    params = default_params()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys = _store(root, n_images)
        seconds: dict[int, list[float]] = {1: [], 2: []}
        for rep in range(reps):
            for processes in (1, 2):  # alternating, so drift on a noisy machine hits both alike
                embedder = params.dedup.embedder.model_copy(update={"processes": processes, "slice_size": 256})
                job = EmbedJob(keys, str(root), embedder, params.storage, str(root / f"out-{processes}-{rep}"))
                start = time.perf_counter()
                embed_parallel(job)
                seconds[processes].append(time.perf_counter() - start)
        start = time.perf_counter()  # the fixed cost of a 2-rank job: torchrun, imports, the merge
        small = params.dedup.embedder.model_copy(update={"processes": 2, "slice_size": 32})
        embed_parallel(EmbedJob(keys[:64], str(root), small, params.storage, str(root / "out-startup")))
        startup = time.perf_counter() - start
    med = {p: statistics.median(s) for p, s in seconds.items()}
    return {"images": n_images, "reps": reps, "seconds": seconds, "two_process_job_on_64_images_s": startup,
            "images_per_s_1_process": n_images / med[1], "images_per_s_2_processes": n_images / med[2],
            "speedup_2_vs_1": med[1] / med[2]}


def real_embeddings(cache: Path = Path("data/cache/embeddings")) -> tuple[np.ndarray, str] | None:
    """The largest embedding cache a pipeline run left (`make run`): real copy-detection descriptors."""
    files = sorted((p for p in cache.glob("*.npz") if "views" not in p.name), key=lambda p: p.stat().st_size)
    if not files:
        return None
    with np.load(files[-1], allow_pickle=False) as data:
        return np.ascontiguousarray(data["vectors"], dtype=np.float32), files[-1].name


def bench_ivfpq(n: int, d: int, k: int = 64, queries: int = 10_000, recall_queries: int = 1_000,
                x: np.ndarray | None = None, source: str = "synthetic clustered") -> dict:
    x = clustered_vectors(n, d, n_centres=max(10, n // 100), spread=1.0) if x is None else x
    nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))
    m = next(m for m in (d // 4, d // 5, d // 7, d // 8, d) if m and d % m == 0)  # ~4-8 dimensions per code byte
    factory = f"IVF{{nlist}},PQ{m}"
    queries, recall_queries = min(queries, n), min(recall_queries, n)
    res: dict = {"n": n, "dim": d, "k": k, "factory": factory.format(nlist=nlist), "queries": queries,
                 "vectors": source}
    for shards in (1, 2):
        start = time.perf_counter()
        index = build_index(x, factory=factory, nlist=nlist, nprobe=16, shards=shards)
        build = time.perf_counter() - start
        out = knn_search(x, x[:queries], k=k, index=index, recall_sample=recall_queries)
        res[f"shards{shards}"] = {"build_s": round(build, 2), "search_s": round(out.search_seconds, 2),
                                  "queries_per_s": round(out.queries_per_s, 1),
                                  "recall_at_k": out.params.get("recall_at_k"),
                                  "bytes_per_vector_codes": m}
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pq-sizes", default="200000x384,1000000x64")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    results: dict = {"machine": {"cpus": os.cpu_count(), "faiss": faiss.__version__,
                                 "python": platform.python_version()}}
    results["embedding"] = bench_embedding(args.images, args.reps)
    results["ivfpq"] = [bench_ivfpq(*(int(v) for v in size.split("x"))) for size in args.pq_sizes.split(",") if size]
    real = real_embeddings()
    if real is None:
        print("real embeddings: none under data/cache/embeddings (run `make run` first); skipped")
    else:
        vectors, name = real
        results["ivfpq"].append(bench_ivfpq(len(vectors), vectors.shape[1], x=vectors, source=f"real: {name}"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    e = results["embedding"]
    print(f"copy-detection embedding, {e['images']} images: 1 process {e['images_per_s_1_process']:,.0f} img/s, "
          f"2 processes {e['images_per_s_2_processes']:,.0f} img/s ({e['speedup_2_vs_1']:.2f}x, median of "
          f"{e['reps']} alternating reps; a 2-process job costs {e['two_process_job_on_64_images_s']:.1f} s to start)")
    for r in results["ivfpq"]:
        for shards in (1, 2):
            s = r[f"shards{shards}"]
            print(f"{r['factory']} on {r['n']:,}x{r['dim']} ({r['vectors']}), {shards} shard(s): build {s['build_s']} s, "
                  f"{s['queries_per_s']:,.0f} queries/s (k={r['k']}), recall@{r['k']} {s['recall_at_k']}")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
