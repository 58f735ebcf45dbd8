"""The pre-training recipe sweep behind the default profile: ``python -m benchmarks.recipe_sweep [NAME ...]``.

Each row is the pretrain stage's own worker code (``tasks.train_launch.run_worker``: FSDP2 on one process, the real
shard loader, the same schedules) run with a few ``--set``-style overrides on top of a params file, on the shards
that `dvc repro shards` wrote. Only knobs change (temperatures, LayerScale init, prototypes, crops, model width,
lr, batch, iterations); the method stays DINO + iBOT + KoLeo with Sinkhorn-Knopp.

Chosen on one split, reported on another: the k-NN monitor here uses the labelled eval set's *train* images only
(first half as the k-NN reference, second half as queries), never its test images, which the eval stage reports
on. Raw pixels on the same selection split are measured in the same run, as the bar to beat.

Writes reports/bench/recipe_sweep.json and .md (one row per configuration: k-NN on the selection split at every
monitor point, DINO loss and teacher target entropy at the end against ln K, training seconds). Not part of the
default `make bench` (it trains every row: minutes each); `make sweep` runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# (name, what it tests, overrides on params.yaml). Every row: 300 iterations of batch 64 (19,200 images), but the
# compute rows at the end.
_PAPER = ["model.layerscale=1.0e-5", "pretrain.optim.teacher_temp=0.07", "pretrain.optim.warmup_teacher_temp=0.04",
          "pretrain.optim.warmup_teacher_temp_epochs=3"]
_300 = ["pretrain.optim.epochs=30"]
# The photometric/crop/lr recipe of the paper, which params.yaml replaced (blur 1.0/0.1/0.5, solarize 0.2, local
# crops 0.05-0.32, base lr 0.004): the first rows measure the temperature/LayerScale choice on top of it.
_PAPER_CROPS = ["pretrain.crops.blur_probs=[1.0,0.1,0.5]", "pretrain.crops.solarize_prob=0.2",
                "pretrain.crops.local_crops_scale=[0.05,0.32]", "pretrain.optim.base_lr=0.004"]
_LONG = ["pretrain.optim.momentum_teacher=0.98", "pretrain.optim.final_momentum_teacher=0.998"]
_SEED = {1: ["seed=1", "pretrain.data.seed=1"], 2: ["seed=2", "pretrain.data.seed=2"]}
SWEEP: list[tuple[str, str, list[str]]] = [
    ("paper-knobs", ("the released configs' knobs: LayerScale 1e-5, teacher temperature 0.04 -> 0.07 "
                     "(30 iterations), the paper's augmentations and lr"), _PAPER + _PAPER_CROPS + _300),
    ("layerscale-off", "paper knobs, LayerScale off", [*_PAPER, *_PAPER_CROPS, "model.layerscale=null", *_300]),
    ("teacher-temp-0.02", "paper knobs, teacher temperature 0.02 throughout",
     ["model.layerscale=1.0e-5", *_PAPER_CROPS, *_300]),
    ("sharp-targets", "LayerScale off + teacher temperature 0.02, the paper's augmentations and lr",
     [*_PAPER_CROPS, *_300]),
    ("sharp-targets-seed1", "the same, seed 1 (weights, data order, crops)", [*_PAPER_CROPS, *_300, *_SEED[1]]),
    ("sharp-targets-seed2", "the same, seed 2", [*_PAPER_CROPS, *_300, *_SEED[2]]),
    ("teacher-temp-0.01", "sharp-targets, teacher temperature 0.01",
     [*_PAPER_CROPS, *_300, "pretrain.optim.teacher_temp=0.01", "pretrain.optim.warmup_teacher_temp=0.01"]),
    ("lr-0.008", "sharp-targets, base lr 0.008", [*_PAPER_CROPS, *_300, "pretrain.optim.base_lr=0.008"]),
    ("no-blur-solarize", "sharp-targets without blur and solarization (seed 1)",
     [*_PAPER_CROPS, *_300, "pretrain.crops.blur_probs=[0.0,0.0,0.0]", "pretrain.crops.solarize_prob=0.0",
      *_SEED[1]]),
    ("local-crops-0.2-0.5", "sharp-targets with local crops of 0.2-0.5 of the image (seed 1)",
     [*_PAPER_CROPS, *_300, "pretrain.crops.local_crops_scale=[0.2,0.5]", *_SEED[1]]),
    ("chosen", "sharp-targets + no blur/solarization + local crops 0.2-0.5 + base lr 0.002 (params.yaml)", _300),
    ("chosen-seed1", "the same, seed 1", [*_300, *_SEED[1]]),
    ("chosen-seed2", "the same, seed 2", [*_300, *_SEED[2]]),
    ("chosen-lr-0.004", "chosen at the paper's base lr 0.004", [*_300, "pretrain.optim.base_lr=0.004"]),
    ("chosen-lr-0.001", "chosen, base lr 0.001", [*_300, "pretrain.optim.base_lr=0.001"]),
    ("chosen-koleo-0.3", "chosen, KoLeo weight 0.3 (paper: 0.1)", [*_300, "pretrain.loss.koleo_loss_weight=0.3"]),
    ("chosen-no-ibot", "chosen without masked-patch (iBOT) training",
     [*_300, "pretrain.loss.mask_sample_probability=0.0"]),
    ("chosen-local-crops-4", "chosen, 4 local crops instead of 2", [*_300, "pretrain.crops.local_crops_number=4"]),
    ("chosen-global-crops-0.5-1", ("chosen, global crops of 0.5-1 of the image (paper: 0.32-1): a 28 px garment "
                                   "stays whole in both views"), [*_300, "pretrain.crops.global_crops_scale=[0.5,1.0]"]),
    ("prototypes-64", "chosen, 64 DINO prototypes", [*_300, "pretrain.loss.dino_head.n_prototypes=64"]),
    ("batch-128", "chosen, batch 128 for 150 iterations (the same images seen)",
     ["pretrain.optim.epochs=15", "pretrain.data.global_batch_size=128"]),
    # Compute: what the same CPU seconds buy. Rows above change the recipe at a fixed 300 iterations; these change
    # the model width, the batch or the iteration count, and their "train s" is the cost to compare.
    ("iterations-900", "chosen, 900 iterations (3x a row's compute)", ["pretrain.optim.epochs=90"]),
    ("width-288", "chosen, 288-d blocks (4 heads of 64) instead of 192-d, 300 iterations",
     [*_300, "model.embed_dim=288", "model.num_heads=4"]),
    ("width-384", "chosen, 384-d blocks (6 heads of 64), 300 iterations", [*_300, "model.embed_dim=384",
                                                                           "model.num_heads=6"]),
    ("batch-32", "chosen, batch 32 for 600 iterations (the same images seen)",
     ["pretrain.optim.epochs=60", "pretrain.data.global_batch_size=32"]),
    ("batch-16", "chosen, batch 16 for 1,200 iterations (the same images seen)",
     ["pretrain.optim.epochs=120", "pretrain.data.global_batch_size=16"]),
    # Token grid: patch 14 on a 56 px crop of a 28 px image is a 4x4 grid (each token 7x7 source pixels, the local
    # crops 2x2); patch 7 gives 8x8 (4x4), about 3.5x the step's FLOPs.
    ("patch-7", "chosen, patch 7 (8x8 tokens per global crop, 4x4 per local one), 300 iterations",
     [*_300, "model.patch_size=7"]),
    # The same question at the quality profile's budget (~15 minutes each, not in the default list: run them by name).
    ("long-3300", "chosen, 3,300 iterations with the quality profile's teacher momentum 0.98 -> 0.998",
     ["pretrain.optim.epochs=330", "pretrain.optim.warmup_epochs=10", *_LONG]),
    ("long-width-384", "the same model at 384-d (6 heads) for 1,300 iterations: about the same CPU seconds",
     ["pretrain.optim.epochs=130", *_LONG, "pretrain.optim.warmup_epochs=3", "model.embed_dim=384",
      "model.num_heads=6"]),
    ("smoke", "3 iterations (a check of this script, not a result)",
     ["pretrain.optim.epochs=1", "pretrain.optim.epoch_length=3", "pretrain.optim.warmup_epochs=0",
      "pretrain.optim.freeze_last_layer_epochs=0"]),
]
DEFAULT_ROWS = [name for name, _, _ in SWEEP if name != "smoke" and not name.startswith("long-")]


def _selection_split(eval_dir: Path, tmp: Path) -> Path:
    """train.csv / test.csv over the eval set's train images only (absolute paths): reference half, query half."""
    import pandas as pd

    table = pd.read_csv(eval_dir / "train.csv")
    table["path"] = [str((eval_dir / p).resolve()) for p in table["path"]]
    half = len(table) // 2
    out = tmp / "selection"
    out.mkdir(parents=True, exist_ok=True)
    table.iloc[:half].to_csv(out / "train.csv", index=False)
    table.iloc[half:2 * half].to_csv(out / "test.csv", index=False)
    return out


def _raw_pixels_top1(selection: Path, n: int, img_size: int, patch_size: int, k: int) -> float:
    from dinov2_core.eval import RawPixelBackbone, knn_classify
    from dinov2_core.eval.monitor import MonitorConfig, knn_probe

    probe = knn_probe(MonitorConfig(eval_dir=str(selection), n_train=n, n_test=n, k=k), img_size, patch_size)
    pixels = RawPixelBackbone(patch_size=patch_size, cls_size=32)
    feats = lambda x: pixels.forward_features(x)["x_norm_clstoken"]
    res = knn_classify(feats(probe.train_images), probe.train_labels, feats(probe.test_images), probe.test_labels,
                       ks=(k,))
    return float(next(iter(res.values()))["top1"])


def run_config(name: str, overrides: list[str], params_file: Path, selection: Path, out: Path, every: int,
               n: int) -> dict[str, Any]:
    from dataclasses import replace

    import pandas as pd

    from dinov2_core.eval.monitor import knn_monitor, random_backbone
    from tasks.params import load_params
    from tasks.pretrain import build_spec
    from tasks.train_launch import run_worker

    sets = [*overrides, f"pretrain.out={out}", f"pretrain.monitor.eval_dir={selection}",
            f"pretrain.monitor.every={every}", f"pretrain.monitor.n_train={n}", f"pretrain.monitor.n_test={n}",
            "pretrain.checkpoint.every=1000000", "pretrain.checkpoint.dir=null"]
    params = load_params(params_file, sets)
    spec = build_spec(params)
    started = time.perf_counter()
    summary = run_worker(spec, params)
    seconds = time.perf_counter() - started
    # the row's own random-init twin (same architecture and seed): what its training adds, for rows whose
    # architecture moves the starting point (width, patch size)
    bb = replace(params.model, img_size=params.pretrain.crops.global_crops_size)
    random_init = knn_monitor(params.pretrain.monitor, {"random_init": random_backbone(bb, params.seed)},
                              bb.img_size, bb.patch_size)["random_init_top1"]
    log = pd.read_csv(out / "run" / "log.csv")
    knn = pd.read_csv(out / "run" / "knn.csv")
    end = log.tail(20)
    k_dino = params.pretrain.loss.dino_head.n_prototypes
    row = {
        "name": name, "overrides": overrides, "iterations": len(log),
        "images_seen": len(log) * params.pretrain.data.global_batch_size,
        "train_seconds": round(float(summary.get("train_seconds", seconds)), 1),
        "knn": [{"images_seen": int(r.images_seen), "top1": float(r.knn_top1)} for r in knn.itertuples()],
        "knn_final": float(knn["knn_top1"].iloc[-1]),
        "random_init_top1": float(random_init),
        "dino_loss_end": round(float(end["loss_dino"].mean()), 4),
        "ln_k": round(math.log(k_dino), 4),
        "teacher_entropy_dino_end": round(float(end["teacher_entropy_dino"].mean()), 4),
        "ibot_loss_end": round(float(end["loss_ibot"].mean()), 4),
        "cls_std_end": round(float(end["cls_std"].mean()), 4),
    }
    print(json.dumps(row), flush=True)
    return row


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"Selection split: {report['selection']}; raw pixels there: k-NN top-1 {report['raw_pixels_top1']:.3f}.",
             "", ("| configuration | iterations | train s | k-NN top-1 (selection) | random-init twin | "
                  "DINO loss end / ln K | teacher entropy end |"), "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        twin = f"{r['random_init_top1']:.3f}" if "random_init_top1" in r else "-"  # rows of an older sweep
        lines.append(f"| {r['name']} | {r['iterations']} | {r['train_seconds']:.0f} | {r['knn_final']:.3f} | {twin} | "
                     f"{r['dino_loss_end']:.3f} / {r['ln_k']:.3f} | {r['teacher_entropy_dino_end']:.3f} |")
    lines += ["", "Rows:"] + [f"- **{name}**: {what}" for name, what, _ in SWEEP if name in
                                {r["name"] for r in report["rows"]}]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="rows to run (default: all)")
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--every", type=int, default=100, help="k-NN monitor period (iterations)")
    parser.add_argument("--n", type=int, default=1000, help="reference and query images of the selection split")
    parser.add_argument("--out", default=str(REPO / "reports" / "bench" / "recipe_sweep.json"))
    if argv is None:
        argv = sys.argv[1:] if __name__ == "__main__" else []
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from tasks.params import load_params

    base = load_params(args.params)
    eval_dir = Path(base.pretrain.monitor.eval_dir)
    rows_wanted = [r for r in SWEEP if r[0] in (args.names or DEFAULT_ROWS)]
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.exists() and args.names else {"rows": []}
    order = [name for name, _, _ in SWEEP]
    rows: list[dict[str, Any]] = []

    def write_report(raw: float) -> dict[str, Any]:
        """Rewritten after every row, so an interrupted sweep keeps the rows it finished."""
        kept = [r for r in previous["rows"] if r["name"] not in {r["name"] for r in rows}]
        merged = sorted(kept + rows, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
        report = {"selection": f"{eval_dir}/train.csv, first {args.n} as reference, next {args.n} as queries "
                               f"(k-NN, k={base.pretrain.monitor.k})",
                  "raw_pixels_top1": raw, "params": str(args.params), "rows": merged,
                  "generated": time.strftime("%Y-%m-%d %H:%M:%S")}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        out_path.with_suffix(".md").write_text(to_markdown(report))
        return report

    with tempfile.TemporaryDirectory() as tmp:
        selection = _selection_split(eval_dir, Path(tmp))
        raw = _raw_pixels_top1(selection, args.n, base.pretrain.crops.global_crops_size, base.model.patch_size,
                               base.pretrain.monitor.k)
        print(f"raw pixels on the selection split: k-NN top-1 {raw:.3f}", flush=True)
        for name, _, sets in rows_wanted:
            rows.append(run_config(name, sets, Path(args.params), selection, Path(tmp) / name, args.every, args.n))
            report = write_report(raw)
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
