"""Speed of the curation algorithms on this machine: copy-detection descriptor, faiss kNN graph (exact vs
IVF), k-means, connected components.

    python -m benchmarks.curation_algos [--n 100000] [--dim 384] [--exact-queries 5000]

The exact k=64 graph over 100k x 384 is O(N^2 d) (~3.8 TFLOP), too slow for a CPU smoke run: it is timed on
``--exact-queries`` queries against the full database and extrapolated linearly to N queries (flat search
cost is linear in the number of queries); the table says so. IVF recall@k is measured against the exact
neighbours of the same query subset. Writes reports/bench/curation_algos.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

from benchmarks.copy_detection_corpora import FASHION_MNIST_ROOT, load_fashion_mnist, natural_tiles
from dinov2_core.curation.components import components_from_knn
from dinov2_core.curation.embed import copy_detection_descriptor, copy_detection_views
from dinov2_core.curation.knn import build_index, default_nlist, knn_search
from dinov2_core.curation.retrieve import kmeans

OUT = Path("reports/bench/curation_algos.json")
SPREAD = float(os.environ.get("BENCH_SPREAD", "1.0"))


def _jitter(c: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    x = c + spread * rng.standard_normal(c.shape, dtype=np.float32) / np.sqrt(c.shape[1])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_vectors(n: int, d: int, n_centres: int, spread: float, seed: int = 0) -> np.ndarray:
    """Unit vectors around centres that are themselves grouped (concepts -> sub-concepts -> images): a
    crude stand-in for image embeddings, with overlapping clusters so IVF recall is not trivially 1."""
    rng = np.random.default_rng(seed)
    top = _jitter(np.zeros((max(1, n_centres // 10), d), np.float32), 1.0, rng)
    centres = _jitter(top[rng.integers(len(top), size=n_centres)], spread, rng)
    return _jitter(centres[rng.integers(n_centres, size=n)], spread, rng)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def bench_descriptor(n_fashion: int = 20000) -> dict:
    res = {}
    if (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists():
        images, _ = load_fashion_mnist()
        pil = [Image.fromarray(a) for a in images[:n_fashion]]
        _, dt = timed(copy_detection_descriptor, pil)
        res["descriptor_fashion_28px_per_s"] = len(pil) / dt
        res["descriptor_fashion_n"] = len(pil)
        _, dt = timed(copy_detection_views, pil)
        res["views_fashion_28px_per_s"] = len(pil) / dt
    tiles = natural_tiles(tile=256, stride=128)
    _, dt = timed(copy_detection_descriptor, tiles)
    res["descriptor_photo_256px_per_s"] = len(tiles) / dt
    res["descriptor_photo_n"] = len(tiles)
    return res


def bench_knn(n: int, d: int, k: int, exact_queries: int, nprobe: int) -> tuple[dict, np.ndarray]:
    x = clustered_vectors(n, d, n_centres=max(10, n // 100), spread=SPREAD)
    res: dict = {"n": n, "dim": d, "k": k}
    # exact: full database, subset of queries, extrapolated
    q = x[:exact_queries]
    flat, t_build = timed(build_index, x, exact_threshold=n)
    (_, ids_e), t_search = timed(flat.search, q, k + 1)
    res["exact_build_s"] = t_build
    res["exact_queries_measured"] = exact_queries
    res["exact_queries_per_s"] = exact_queries / t_search
    res["exact_graph_s_extrapolated"] = t_search * n / exact_queries
    # IVF: whole graph
    nlist = default_nlist(n)
    ivf, t_build = timed(build_index, x, exact_threshold=0, nlist=nlist, nprobe=nprobe)
    graph, t_graph = timed(knn_search, x, k=k, index=ivf)
    res.update(
        {
            "ivf_nlist": nlist,
            "ivf_nprobe": nprobe,
            "ivf_build_s": t_build,
            "ivf_graph_s": t_graph,
            "ivf_queries_per_s": graph.queries_per_s,
        }
    )
    exact_nb = [set(row[row != i][:k].tolist()) for i, row in enumerate(ids_e)]

    def recall(ids: np.ndarray) -> float:
        return float(np.mean([len(set(ids[i].tolist()) & exact_nb[i]) / k for i in range(exact_queries)]))

    res["ivf_recall_at_k"] = recall(graph.ids)
    for p in (1, 4):  # cheaper probes, on the query subset only
        ivf.nprobe = p
        sub = knn_search(x, q, k=k + 1, index=ivf)
        res[f"ivf_recall_at_k_nprobe{p}"] = recall(np.array([r[r != i][:k] for i, r in enumerate(sub.ids)]))
        res[f"ivf_queries_per_s_nprobe{p}"] = sub.queries_per_s
    ivf.nprobe = nprobe
    thr = float(np.quantile(graph.sims[:, 0], 0.5))  # a threshold that links about half the points
    labels, t_cc = timed(components_from_knn, graph.sims, graph.ids, thr)
    res.update({"components_s": t_cc, "components_threshold": thr, "n_components": int(labels.max() + 1)})
    return res, x


def bench_kmeans(x: np.ndarray, n_clusters: int, niter: int) -> dict:
    (_, labels), dt = timed(kmeans, x, n_clusters, niter=niter, seed=0)
    return {
        "kmeans_n": len(x),
        "kmeans_clusters": n_clusters,
        "kmeans_niter": niter,
        "kmeans_s": dt,
        "kmeans_empty_clusters": int(n_clusters - len(np.unique(labels))),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--exact-queries", type=int, default=5_000)
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--clusters", type=int, default=1_000)
    ap.add_argument("--kmeans-iter", type=int, default=10)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "faiss": faiss.__version__,
            "python": platform.python_version(),
        }
    }
    results["descriptor"] = bench_descriptor()
    knn_res, x = bench_knn(args.n, args.dim, args.k, args.exact_queries, args.nprobe)
    results["knn"] = knn_res
    results["kmeans"] = bench_kmeans(x, args.clusters, args.kmeans_iter)
    results["total_s"] = time.perf_counter() - t0

    d, kn, km = results["descriptor"], results["knn"], results["kmeans"]
    rows = [
        (
            "copy-detection descriptor, 28px Fashion-MNIST",
            f"{d.get('descriptor_fashion_28px_per_s', float('nan')):,.0f} img/s",
        ),
        ("copy-detection descriptor, 256px photo tiles", f"{d['descriptor_photo_256px_per_s']:,.0f} img/s"),
        (
            "copy-detection centre-crop views (4 per image), 28px",
            f"{d.get('views_fashion_28px_per_s', float('nan')):,.0f} img/s",
        ),
        (
            f"exact kNN graph {kn['n']:,}x{kn['dim']} k={kn['k']} (EXTRAPOLATED from {kn['exact_queries_measured']:,} queries)",
            f"{kn['exact_graph_s_extrapolated']:,.1f} s  ({kn['exact_queries_per_s']:,.0f} q/s)",
        ),
        (
            f"IVF kNN graph nlist={kn['ivf_nlist']} nprobe={kn['ivf_nprobe']} (build + search, measured)",
            f"{kn['ivf_build_s']:.1f} + {kn['ivf_graph_s']:.1f} s  ({kn['ivf_queries_per_s']:,.0f} q/s)",
        ),
        (
            f"IVF recall@{kn['k']} vs exact (nprobe 1 / 4 / {kn['ivf_nprobe']})",
            f"{kn['ivf_recall_at_k_nprobe1']:.3f} / {kn['ivf_recall_at_k_nprobe4']:.3f} / {kn['ivf_recall_at_k']:.3f}",
        ),
        ("connected components of the IVF graph", f"{kn['components_s']:.2f} s"),
        (
            f"k-means {km['kmeans_n']:,}x{kn['dim']} -> {km['kmeans_clusters']} clusters, {km['kmeans_niter']} iters",
            f"{km['kmeans_s']:.1f} s",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(
        f"curation algorithms on {results['machine']['cpus']} CPUs (faiss threads: "
        f"{results['machine']['faiss_threads']})"
    )
    for name, val in rows:
        print(f"  {name:<{width}}  {val}")
    print(f"  total {results['total_s']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
