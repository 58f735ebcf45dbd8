"""The `pretrain` stage: DINOv2 self-supervised pre-training on the WebDataset shards (paper Sec. 3-4).

`run_pretrain(params)` checks its inputs, starts the torchrun workers (`tasks/train_worker.py`, one process by
default; `launch.*` for more processes or nodes), and writes the reports. The workers shard the student/teacher with
FSDP2, resume from the newest checkpoint of the same configuration, and export the teacher backbone in the official
format (`data/pretrain/export/teacher_backbone.pth`, loads with strict=True into `dinov2_core.hub` constructors, the
exact call in `model.json`) plus a full checkpoint with heads (`full.pth`) for the adapt stage.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from dinov2_core.eval.monitor import knn_monitor, random_backbone
from dinov2_core.hub import load_export
from dinov2_core.train.engine import TrainSpec
from dinov2_core.train.export import export_ssl
from dinov2_core.train.ssl_meta_arch import SSLMetaArch
from tasks.log import get_logger
from tasks.params import Params, params_record
from tasks.train_launch import (
    check_batch,
    check_crops,
    is_main_node,
    launch_workers,
    read_shard_index_table,
    shard_index_checks,
    stage_code,
)
from tasks.train_reports import prototype_counts, write_training_reports
from tasks.validation import validate_stage

log = get_logger("pretrain")


def build_spec(params: Params) -> TrainSpec:
    """Worker-side description of the run (every torchrun process builds the same one)."""
    p = params.pretrain
    bb = replace(params.model, img_size=p.crops.global_crops_size)
    loss, optim = p.loss, p.optim
    _, index_sha = read_shard_index_table(p.data.shards, params)
    return TrainSpec(
        stage="pretrain",
        out=Path(p.out),
        build=lambda: SSLMetaArch(bb, loss, n_local_crops=p.crops.local_crops_number),
        init_fresh=lambda meta: None,
        export=lambda full, export_dir, step: export_ssl(full, export_dir, step, bb, loss, p.crops, optim, "pretrain"),
        data=p.data, crops=p.crops, loss=loss, optim=optim,
        code_files=stage_code(__file__),
        monitor=p.monitor,
        checkpoint_every=p.checkpoint.every, checkpoint_keep=p.checkpoint.keep,
        checkpoint_dir=p.checkpoint.dir,
        digest_payload={"model": bb.as_dict(), "pretrain": p.model_dump(
            mode="json", exclude={"checkpoint", "monitor", "out"}), "shards_index_sha256": index_sha,
            "seed": params.seed},
        seed=params.seed,
    )


def run_pretrain(params: Params) -> dict[str, Any]:
    """Check the shards, train through torchrun, report losses / schedules / throughput and a k-NN check."""
    started = time.perf_counter()
    p = params.pretrain
    check_crops("pretrain", p.crops, params.model.patch_size)
    check_batch("pretrain", p.data, params.launch)
    index, _ = read_shard_index_table(p.data.shards, params)
    validate_stage("pretrain-input", shard_index_checks(index, p.data.global_batch_size), params.reports)

    run_dir = launch_workers("pretrain", params, Path(p.out))
    if not is_main_node(params.launch):
        return {"node_rank": params.launch.node_rank}  # node 0 reports the run
    export_dir = Path(p.out) / "export"
    summary = _read_json(export_dir / "summary.json")
    bb = replace(params.model, img_size=p.crops.global_crops_size)
    teacher = load_export(export_dir / "model.json", "teacher_backbone.pth")
    baselines = {"random_init": random_backbone(bb, params.seed)}  # LayerScale 1.0 (hub default): the fair one
    if bb.layerscale:  # the training init (1e-5) differs from it; without LayerScale it would be the same network
        baselines["random_init_as_trained"] = random_backbone(bb, params.seed, layerscale=bb.layerscale)
    knn = knn_monitor(p.monitor, {"teacher": teacher, **baselines}, p.crops.global_crops_size, bb.patch_size)
    metrics = {
        "summary": summary,
        "knn": knn,
        "images_seen": p.optim.epochs * p.optim.epoch_length * p.data.global_batch_size,
        "shard_images": int(index["count"].sum()),
        "world_size": params.launch.nproc_per_node * params.launch.nnodes,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "params": {"model": bb.as_dict(), "pretrain": params_record(p)},
    }
    metrics = write_training_reports("pretrain", params, run_dir, p.optim.epochs * p.optim.epoch_length, export_dir,
                                     ["teacher_backbone.pth", "full.pth"], metrics,
                                     n_prototypes=prototype_counts(p.loss), embed_dim=teacher.embed_dim)
    log.info("pretrain: %d iterations, loss %.3f -> %.3f, k-NN top-1 teacher %s vs random init %s (%.0f s)",
             metrics.get("iterations", 0), metrics.get("loss_start_mean", float("nan")),
             metrics.get("loss_end_mean", float("nan")), knn.get("teacher_top1"), knn.get("random_init_top1"),
             metrics["wall_seconds"])
    return metrics


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
