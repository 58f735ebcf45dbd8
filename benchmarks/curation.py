"""End-to-end curation on the default data, stage by stage, plus embeddings/s per embedder.

Runs demo-data -> ingest -> dedup -> decontaminate -> retrieve -> shards in a temporary folder with the
default params (fresh embedding cache, so embedding cost is included) and writes reports/bench/curation.json.
The algorithm-level figures (faiss kNN graph 100k x 384 exact vs IVF, k-means) are in curation_algos.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

OUT = Path("reports/bench/curation.json")
CHAIN = ["demo-data", "ingest", "dedup", "decontaminate", "retrieve", "shards"]


def _embedder_throughput(images) -> dict:
    """Images/s of each embedder on the same real images: copy-detection descriptor and a ViT-S/14 at 224."""
    import torch

    from dinov2_core.curation import BackboneEmbedder, CopyDetectionEmbedder
    from dinov2_core.hub import dinov2_vits14

    out = {}
    cd = CopyDetectionEmbedder(progress=False)
    t = time.perf_counter()
    cd.embed(images)
    out["copy_detection"] = round(len(images) / (time.perf_counter() - t), 1)
    t = time.perf_counter()
    cd.embed_views(images)
    out["copy_detection_views"] = round(len(images) / (time.perf_counter() - t), 1)
    torch.manual_seed(0)
    vit = BackboneEmbedder(dinov2_vits14(pretrained=False), image_size=224, batch_size=32, progress=False)
    sub = images[:64]
    vit.embed(sub[:8])  # warm-up
    t = time.perf_counter()
    vit.embed(sub)
    out["dinov2_vits14_224px"] = round(len(sub) / (time.perf_counter() - t), 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    import os

    from tasks.image_store import ImageStore
    from tasks.params import load_params
    from tasks.stages import STAGES

    root_params = Path("params.yaml").resolve()
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-curation-") as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            params = load_params(root_params, [f"reports={tmp}/reports"])
            for name in CHAIN:
                start = time.perf_counter()
                STAGES[name].load()(params)
                timings[name] = round(time.perf_counter() - start, 2)
            store = ImageStore(params.ingest.out)
            keys = store.manifest["sha256"].tolist()[:2000]
            images = [store.load(k) for k in keys]
            metrics = {s: json.loads((Path(tmp) / "reports" / "metrics" / f"{s}.json").read_text())
                       for s in CHAIN[1:]}
        finally:
            os.chdir(cwd)
    results = {
        "stage_seconds": timings,
        "curation_seconds_total": round(sum(v for k, v in timings.items() if k != "demo-data"), 2),
        "crawl_rows": metrics["ingest"]["input_rows"],
        "ingest_images_per_s": metrics["ingest"]["images_per_second"],
        "dedup_knn_queries_per_s": metrics["dedup"]["knn"].get("knn_queries_per_s"),
        "curated": metrics["retrieve"]["curated"],
        "embeddings_per_s": _embedder_throughput(images),
        "quality": {s: metrics[s].get("quality") for s in ("dedup", "decontaminate", "retrieve")},
    }
    print(f"{'stage':<16}{'seconds':>10}")
    for name, sec in timings.items():
        print(f"{name:<16}{sec:>10.2f}")
    print(f"{'curation total':<16}{results['curation_seconds_total']:>10.2f}  ({results['crawl_rows']} crawl rows)")
    for name, rate in results["embeddings_per_s"].items():
        print(f"embeddings/s {name:<26}{rate:>10}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o)))
    return results


if __name__ == "__main__":
    main()
