#!/usr/bin/env python3
"""Paper-scale cost model (infra/SCALE.md): what LVD-142M curation and ViT-g/14 training cost, from throughput.

Every figure carries its source:
  measured  - read from this repository's reports (reports/bench/*.json from `make bench`, reports/metrics/*.json
              from `make run`) on the machine that produced them (here: 2 CPU cores, no GPU);
  computed  - derived exactly from the model/profile (FLOPs on the meta device: tasks/train_cost.py);
  paper     - stated in Oquab et al. 2023 (DINOv2);
  ASSUMED   - a planning assumption for hardware we do not have here (GPU throughput, prices). Replace them with
              measurements from the target cluster; they are the only numbers in this model nobody measured.
A figure whose source report is missing prints as a SLOT with the command that fills it.

    python infra/cost_model.py            # Markdown table
    python infra/cost_model.py --json     # the same numbers as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# ---- planning assumptions (ASSUMED: change these for your cluster and prices) --------------------------------
ASSUMPTIONS: dict[str, tuple[float, str]] = {
    "crawl_images": (1.2e9, "paper: ~1.2B images in the uncurated pool after filtering"),
    "curated_images": (142e6, "paper: LVD-142M"),
    "avg_crawl_image_kb": (150.0, "ASSUMED mean size of a crawled web JPEG"),
    "avg_shard_image_kb": (110.0, "ASSUMED mean size after ingest normalisation (stored bytes)"),
    "ingest_img_per_core_s_fullsize": (40.0, "ASSUMED decode-verify+sha256 of a full-size JPEG per CPU core"),
    "gpu_infer_mfu": (0.45, "ASSUMED utilisation of a batched fp16/bf16 ViT-L/14 forward (embedding pass)"),
    "gpu_ivfpq_queries_s": (40000.0, "ASSUMED faiss-gpu IVF65536,PQ64 k=64 nprobe 32 on a 1B index, per A100"),
    "gpu_kmeans_speedup_vs_2core": (300.0, "ASSUMED faiss-gpu k-means vs the 2-core CPU measured here"),
    "kmeans_clusters_paper": (100000.0, "paper (cluster-based retrieval); sharded/hierarchical at this size"),
    "kmeans_train_points": (50e6, "ASSUMED sample the centroids are trained on; all points are then assigned"),
    "kmeans_iters": (20.0, "ASSUMED"),
    "embed_dim": (1024.0, "computed: ViT-L/14 embedding width"),
    "gpu_tflops_bf16": (312.0, "A100 bf16 dense peak (vendor spec)"),
    "gpu_mfu": (0.40, "ASSUMED sustained model-FLOP utilisation for ViT-g FSDP"),
    "usd_per_gpu_hour": (2.5, "ASSUMED A100-80GB price (reserved/spot mix)"),
    "usd_per_cpu_core_hour": (0.04, "ASSUMED"),
    "usd_per_gb_month_s3": (0.023, "ASSUMED S3 Standard list price"),
    "s3_put_usd_per_1k": (0.005, "ASSUMED S3 PUT price"),
}


@dataclass
class Row:
    item: str
    value: float | None
    unit: str
    source: str  # measured / computed / paper / ASSUMED / SLOT
    note: str


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _get(data: dict | None, *keys: str) -> float | None:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return float(data) if isinstance(data, (int, float)) else None


def measured(root: Path = ROOT) -> dict[str, tuple[float | None, str]]:
    """Throughputs measured on this machine, each with the report it came from (None: not measured yet)."""
    bench = root / "reports" / "bench"
    backbone = _load(bench / "backbone.json")
    curation = _load(bench / "curation_algos.json")
    ingest = _load(root / "reports" / "metrics" / "ingest.json")
    shards = _load(root / "reports" / "metrics" / "shards.json")
    scale = _load(bench / "scale_out.json")
    pq = max((scale or {}).get("ivfpq") or [{}], key=lambda r: r.get("n", 0))
    vits = None
    if backbone:
        vits = next((r.get("images_per_s") for r in backbone.get("rows", [])
                     if r.get("variant", "").startswith("ours: sdpa")), None)
    cores = _get(curation, "machine", "cpus") or 2.0
    return {
        "cpu_cores": (cores, "reports/bench/curation_algos.json"),
        "ingest_img_s": (_get(ingest, "images_per_second"), "reports/metrics/ingest.json (make run)"),
        "ingest_workers": (_get(ingest, "workers"), "reports/metrics/ingest.json"),
        "descriptor_img_s": (_get(curation, "descriptor", "descriptor_photo_256px_per_s"),
                             "reports/bench/curation_algos.json (make bench)"),
        "knn_ivf_queries_s": (_get(curation, "knn", "ivf_queries_per_s"), "reports/bench/curation_algos.json"),
        "knn_n": (_get(curation, "knn", "n"), "reports/bench/curation_algos.json"),
        "kmeans_s": (_get(curation, "kmeans", "kmeans_s"), "reports/bench/curation_algos.json"),
        "kmeans_n": (_get(curation, "kmeans", "kmeans_n"), "reports/bench/curation_algos.json"),
        "kmeans_k": (_get(curation, "kmeans", "kmeans_clusters"), "reports/bench/curation_algos.json"),
        "kmeans_iters": (_get(curation, "kmeans", "kmeans_niter"), "reports/bench/curation_algos.json"),
        "kmeans_dim": (_get(curation, "knn", "dim"), "reports/bench/curation_algos.json"),
        "cpu_matmul_gflops": (_get(backbone, "matmul_peak_gflops_fp32"), "reports/bench/backbone.json (make bench)"),
        "vits_train_img_s_cpu": (float(vits) if vits else None, "reports/bench/backbone.json"),
        "shard_write_mb_s": (_get(shards, "write_mb_per_s"), "reports/metrics/shards.json (make run)"),
        "embed_speedup_2proc": (_get(scale, "embedding", "speedup_2_vs_1"),
                                "reports/bench/scale_out.json (make bench)"),
        "ivfpq_queries_s": (_get(pq, "shards1", "queries_per_s"), "reports/bench/scale_out.json"),
        "ivfpq_recall": (_get(pq, "shards1", "recall_at_k"), "reports/bench/scale_out.json"),
        "ivfpq_n": (pq.get("n"), "reports/bench/scale_out.json"),
    }


def embed_flops() -> float:
    """Forward FLOPs of the ViT-L/14 embedder at 224 px (exact when dinov2_core is importable)."""
    try:
        from dinov2_core.cost import forward_flops

        result = forward_flops("vit_large", 224)
        return float(result["total"] if isinstance(result, dict) and "total" in result else
                     sum(v for v in result.values() if isinstance(v, (int, float))) if isinstance(result, dict)
                     else result)
    except Exception:
        params, tokens = 304e6, 257
        return 2 * params * tokens * 1.05  # matmuls + ~5% attention


def training_cost() -> dict[str, Any] | None:
    """GPU-hours of pretrain/adapt/distill for params.paper.yaml (tasks/train_cost.py, meta-device FLOPs)."""
    try:
        from tasks.params import load_params
        from tasks.train_cost import train_cost

        return train_cost(load_params(ROOT / "params.paper.yaml"), gpu_tflops=ASSUMPTIONS["gpu_tflops_bf16"][0],
                          mfu=ASSUMPTIONS["gpu_mfu"][0])
    except Exception:  # the training stages are not installed yet / profile changed
        return None


def model(root: Path = ROOT, with_training: bool = True) -> list[Row]:
    a = {k: v for k, (v, _) in ASSUMPTIONS.items()}
    m = measured(root)
    rows: list[Row] = []

    def add(item, value, unit, source, note=""):
        rows.append(Row(item, None if value is None else float(value), unit, source, note))

    def slot(item, unit, how):
        rows.append(Row(item, None, unit, "SLOT", f"fill with: {how}"))

    # -- measured here (CPU) -------------------------------------------------------------------------------
    for key, unit, how in (("ingest_img_s", "img/s", "make run"), ("descriptor_img_s", "img/s", "make bench"),
                           ("knn_ivf_queries_s", "queries/s", "make bench"), ("kmeans_s", "s", "make bench"),
                           ("cpu_matmul_gflops", "GFLOP/s", "make bench"),
                           ("vits_train_img_s_cpu", "img/s", "make bench"),
                           ("shard_write_mb_s", "MB/s", "make run"),
                           ("embed_speedup_2proc", "x", "make bench"), ("ivfpq_queries_s", "queries/s", "make bench"),
                           ("ivfpq_recall", "recall@64", "make bench")):
        value, src = m[key]
        if value is None:
            slot(f"measured: {key}", unit, how)
        else:
            add(f"measured: {key}", value, unit, "measured", f"{src}, {int(m['cpu_cores'][0])} CPU cores")

    n_crawl, n_cur = a["crawl_images"], a["curated_images"]
    # -- ingest (CPU fleet) ----------------------------------------------------------------------------------
    per_core_small = (m["ingest_img_s"][0] or 0) / m["cpu_cores"][0] if m["ingest_img_s"][0] else None
    if per_core_small:
        add("ingest: per core, demo-size images", per_core_small, "img/s/core", "measured",
            "small (28-256 px) images from local disk: an upper bound")
    ingest_core_h = n_crawl / a["ingest_img_per_core_s_fullsize"] / 3600
    add("ingest: 1.2B full-size images", ingest_core_h, "core-hours", "ASSUMED",
        f"at {a['ingest_img_per_core_s_fullsize']:.0f} img/s/core; network fetch excluded")
    # -- embeddings (GPU) --------------------------------------------------------------------------------------
    flops = embed_flops()
    embed_rate = a["gpu_tflops_bf16"] * 1e12 * a["gpu_infer_mfu"] / flops
    add("embedding: ViT-L/14 224px forward", flops / 1e9, "GFLOP/img", "computed", "dinov2_core.cost")
    embed_gpu_h = 2 * n_crawl / embed_rate / 3600  # copy-detection + retrieval embeddings
    add("embeddings: copy-detection + retrieval, 1.2B x 2", embed_gpu_h, "GPU-hours", "ASSUMED",
        f"{embed_rate:.0f} img/s/GPU = peak x {a['gpu_infer_mfu']:.0%} / FLOPs")
    # -- kNN graph (faiss-gpu IVF-PQ) --------------------------------------------------------------------------
    if m["knn_ivf_queries_s"][0]:
        cpu_knn_h = n_crawl / m["knn_ivf_queries_s"][0] / 3600
        add("dedup kNN graph on the measured CPU IVF (100k index)", cpu_knn_h, "machine-hours", "measured",
            "lower bound: the measured index is 10^4x smaller than 1.2B")
    if m["ivfpq_queries_s"][0]:
        add(f"dedup kNN graph on the measured CPU IVF-PQ ({int(m['ivfpq_n'][0]):,} index)",
            n_crawl / m["ivfpq_queries_s"][0] / 3600, "machine-hours", "measured",
            f"recall@64 {m['ivfpq_recall'][0]}; lower bound: search cost grows with the index")
    knn_gpu_h = n_crawl / a["gpu_ivfpq_queries_s"] / 3600
    add("dedup kNN graph: 1.2B queries, IVF-PQ k=64", knn_gpu_h, "GPU-hours", "ASSUMED",
        f"{a['gpu_ivfpq_queries_s']:.0f} queries/s/GPU, index sharded over 8 GPUs/node")
    # -- k-means (cluster-based retrieval) ---------------------------------------------------------------------
    if m["kmeans_s"][0] and m["kmeans_n"][0]:
        work_measured = m["kmeans_n"][0] * m["kmeans_k"][0] * m["kmeans_dim"][0] * m["kmeans_iters"][0]
        rate = work_measured / m["kmeans_s"][0]  # point x centroid x dim per second (measured, 2 cores)
        work_train = a["kmeans_train_points"] * a["kmeans_clusters_paper"] * a["embed_dim"] * a["kmeans_iters"]
        work_assign = n_crawl * a["kmeans_clusters_paper"] * a["embed_dim"]
        cpu_h = (work_train + work_assign) / rate / 3600
        add("k-means 100k clusters at the measured CPU rate", cpu_h, "machine-hours", "measured",
            f"{rate:.3g} point-centroid-dims/s measured; train on {a['kmeans_train_points']:.0e} pts + assign all")
        add("k-means 100k clusters on GPUs", cpu_h / a["gpu_kmeans_speedup_vs_2core"], "GPU-hours", "ASSUMED",
            f"{a['gpu_kmeans_speedup_vs_2core']:.0f}x the 2-core CPU")
    else:
        slot("k-means 100k clusters", "GPU-hours", "make bench (reports/bench/curation_algos.json)")
    # -- training ----------------------------------------------------------------------------------------------
    train = training_cost() if with_training else None
    train_h = 0.0
    if train:
        for stage in ("pretrain", "adapt", "distill"):
            info = train[stage]
            add(f"{stage}: {info['arch']} {info['img_size']}px x {info['iterations']:,} it", info["gpu_hours"],
                "GPU-hours", "computed", f"{info['flops_per_step'] / 1e15:.1f} PFLOP/iteration at "
                f"{a['gpu_tflops_bf16']:.0f} TFLOP/s x {a['gpu_mfu']:.0%} MFU (ASSUMED)")
            train_h += info["gpu_hours"]
        if m["cpu_matmul_gflops"][0]:
            cpu_years = train["pretrain"]["total_flops"] / (m["cpu_matmul_gflops"][0] * 1e9) / 3600 / 24 / 365
            add("pretrain on this machine's measured matmul peak", cpu_years, "years", "measured",
                "why it cannot run here")
    else:
        slot("training GPU-hours", "GPU-hours", "python -m tasks.train_cost -p params.paper.yaml")
    # -- the curation loop (tasks/loop.py): one more round re-embeds the pool with the new teacher, retrieves again
    # and pre-trains again; dedup and decontamination are not redone
    round_h = n_crawl / embed_rate / 3600 + (train["pretrain"]["gpu_hours"] if train else 0.0)
    add("curation loop: per extra round (re-embed 1.2B, retrieve, pretrain)", round_h, "GPU-hours", "computed",
        "the embedding row's rate + the pretrain row; retrieval search is small next to both")
    loop = _load(root / "reports" / "bench" / "curation_loop.json")
    if loop and "round-2" in loop.get("rounds", {}):
        add("curation loop: round 2 / round 1 time on this machine",
            loop["rounds"]["round-2"]["seconds"] / max(loop["rounds"]["round-1"]["seconds"], 1e-9), "x", "measured",
            "python -m benchmarks.curation_loop (round 1 also runs ingest, dedup, adapt, distill)")
    else:
        slot("curation loop: round 2 / round 1 time", "x", "python -m benchmarks.curation_loop")
    add("paper: ViT-g/14 pretraining, reported", 22016, "GPU-hours", "paper",
        "A100-40GB (carbon-footprint table); compare with the computed figure above")
    add("paper: LVD-142M curation, reported upper bound", 20 * 8 * 48, "GPU-hours", "paper",
        "20 nodes x 8 V100-32GB, 'less than two days'")
    # -- storage -----------------------------------------------------------------------------------------------
    raw_tb = n_crawl * a["avg_crawl_image_kb"] / 1e9
    shard_tb = n_cur * a["avg_shard_image_kb"] / 1e9
    ckpt_gb = 1.14e9 * (4 + 4 + 8 + 4) / 1e9  # fp32 teacher + student + Adam moments + fp32 grads/master
    add("storage: raw crawl store (content-addressed)", raw_tb, "TB", "ASSUMED", "s3://.../ingest/")
    add("storage: LVD-142M WebDataset shards", shard_tb, "TB", "ASSUMED", "s3://.../shards/")
    add("storage: one resumable ViT-g checkpoint", ckpt_gb, "GB", "computed", "1.14B params x 20 bytes")
    # -- money -------------------------------------------------------------------------------------------------
    gpu_h = embed_gpu_h + knn_gpu_h + train_h
    add("total GPU-hours (curation + training)", gpu_h, "GPU-hours", "computed", "sum of the rows above")
    add("compute cost", gpu_h * a["usd_per_gpu_hour"] + ingest_core_h * a["usd_per_cpu_core_hour"], "USD",
        "ASSUMED", f"${a['usd_per_gpu_hour']}/GPU-h, ${a['usd_per_cpu_core_hour']}/core-h")
    add("storage cost per month", (raw_tb + shard_tb) * 1000 * a["usd_per_gb_month_s3"], "USD/month", "ASSUMED",
        "raw + shards in S3 Standard; move raw to an infrequent-access class after curation")
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| item | value | unit | source | note |", "|---|---:|---|---|---|"]
    for r in rows:
        value = "**SLOT**" if r.value is None else (f"{r.value:,.0f}" if abs(r.value) >= 100 else f"{r.value:.3g}")
        lines.append(f"| {r.item} | {value} | {r.unit} | {r.source} | {r.note} |")
    lines.append("")
    lines.append("Assumptions (edit `ASSUMPTIONS` in infra/cost_model.py):")
    lines += [f"- `{k}` = {v:g}: {why}" for k, (v, why) in ASSUMPTIONS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--root", type=Path, default=ROOT, help="project whose reports/ to read")
    parser.add_argument("--no-training", action="store_true", help="skip the meta-device FLOP count")
    args = parser.parse_args(argv)
    rows = model(args.root, with_training=not args.no_training)
    print(json.dumps([asdict(r) for r in rows], indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
