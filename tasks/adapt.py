"""The `adapt` stage: a short high-resolution phase after pre-training (paper Sec. 4, "Adaptive resolution":
518 px for ~10k iterations at the end of training; the default CPU profile uses 126 px = 2.25x the 56-px
pre-training crops, and a few dozen iterations).

It starts from the pre-training's full checkpoint (student, teacher, both heads, loss centres) with a fresh AdamW
and its own compressed schedules (lower lr, no teacher-temperature warm-up, no last-layer freeze).

Positional embeddings at the switch: the model keeps its ``pos_embed`` parameter, rebuilt for the new size. Both
student and teacher are re-created with ``img_size`` = the new global crop size, and their ``pos_embed`` is set to
exactly the table the old model would have interpolated for that size (its own ``interpolate_pos_encoding``: bicubic,
same offset/antialias settings). So at the switch the new model computes the same function as the old one at the new
resolution, and the exported backbone loads with ``img_size=<new size>`` (``model.json`` spells out the hub call).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from dinov2_core.config import BackboneConfig, LossConfig
from dinov2_core.eval.monitor import knn_monitor, random_backbone
from dinov2_core.hub import load_checkpoint, load_export
from dinov2_core.train.engine import TrainSpec
from dinov2_core.train.export import export_ssl, sha256_file
from dinov2_core.train.resolution import adapted_state
from dinov2_core.train.ssl_meta_arch import SSLMetaArch
from tasks.log import get_logger
from tasks.params import Params, ParamsError, params_record
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

log = get_logger("adapt")


def load_full_checkpoint(path: str) -> dict[str, Any]:
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: the full checkpoint to start from is missing (run the previous stage)")
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except ValueError as exc:  # truncated, another format: one line naming the file
        raise ValueError(f"adapt.init: {exc}; point it at the full checkpoint pretrain exported (full.pth)") from exc
    if not isinstance(ckpt, dict) or not {"student", "teacher", "config"} <= set(ckpt):
        raise ValueError(f"{path}: not a full training checkpoint (needs student, teacher and config entries)")
    return ckpt


def build_spec(params: Params) -> TrainSpec:
    a = params.adapt
    ckpt = load_full_checkpoint(a.init)
    old_bb = BackboneConfig.from_dict(ckpt["config"]["backbone"])
    loss = LossConfig.from_dict(ckpt["config"]["loss"])
    bb = replace(old_bb, img_size=a.crops.global_crops_size)
    optim = a.optim
    _, index_sha = read_shard_index_table(a.data.shards, params)

    def init_fresh(meta) -> None:
        meta.student.load_state_dict(adapted_state(ckpt["student"], old_bb, bb.img_size), strict=True)
        meta.teacher.load_state_dict(adapted_state(ckpt["teacher"], old_bb, bb.img_size), strict=True)
        with torch.no_grad():
            meta.dino_loss.center.copy_(ckpt["dino_loss_center"])
            meta.ibot_patch_loss.center.copy_(ckpt["ibot_patch_loss_center"])

    return TrainSpec(
        stage="adapt",
        out=Path(a.out),
        build=lambda: SSLMetaArch(bb, loss, n_local_crops=a.crops.local_crops_number),
        init_fresh=init_fresh,
        export=lambda full, export_dir, step: export_ssl(full, export_dir, step, bb, loss, a.crops, optim, "adapt"),
        data=a.data, crops=a.crops, loss=loss, optim=optim,
        code_files=stage_code(__file__),
        monitor=a.monitor,
        checkpoint_every=a.checkpoint.every, checkpoint_keep=a.checkpoint.keep,
        checkpoint_dir=a.checkpoint.dir,
        digest_payload={"adapt": a.model_dump(mode="json", exclude={"checkpoint", "monitor", "out"}),
                        "init_sha256": sha256_file(Path(a.init)), "shards_index_sha256": index_sha,
                        "seed": params.seed},
        seed=params.seed,
        extra_summary={"img_size_before": old_bb.img_size, "img_size_after": bb.img_size},
    )


def run_adapt(params: Params) -> dict[str, Any]:
    started = time.perf_counter()
    a = params.adapt
    ckpt = load_full_checkpoint(a.init)
    old_bb = BackboneConfig.from_dict(ckpt["config"]["backbone"])
    prototypes = prototype_counts(ckpt["config"]["loss"])
    check_crops("adapt", a.crops, old_bb.patch_size)
    check_batch("adapt", a.data, params.launch)
    if a.crops.global_crops_size < old_bb.img_size:
        raise ParamsError(f"adapt.crops.global_crops_size: {a.crops.global_crops_size} is below the pre-training "
                          f"size {old_bb.img_size} (adaptation raises the resolution)")
    index, _ = read_shard_index_table(a.data.shards, params)
    validate_stage("adapt-input", shard_index_checks(index, a.data.global_batch_size), params.reports)
    del ckpt

    run_dir = launch_workers("adapt", params, Path(a.out))
    if not is_main_node(params.launch):
        return {"node_rank": params.launch.node_rank}  # node 0 reports the run
    export_dir = Path(a.out) / "export"
    summary = json.loads((export_dir / "summary.json").read_text())
    bb = replace(old_bb, img_size=a.crops.global_crops_size)
    teacher = load_export(export_dir / "model.json", "teacher_backbone.pth")
    before = load_export(Path(a.init).with_name("model.json"), "teacher_backbone.pth") \
        if Path(a.init).with_name("model.json").exists() else None
    knn = knn_monitor(a.monitor, {"teacher": teacher, "random_init": random_backbone(bb, params.seed)},
                      a.crops.global_crops_size, bb.patch_size)
    if before is not None:  # and at the pre-training resolution: did the adaptation keep the low-res features?
        low = knn_monitor(a.monitor, {"teacher": teacher, "pretrain_teacher": before}, old_bb.img_size, bb.patch_size)
        knn["at_pretrain_size"] = low
    total = a.optim.epochs * a.optim.epoch_length
    metrics = {
        "summary": summary,
        "knn": knn,
        "img_size": {"before": old_bb.img_size, "after": bb.img_size},
        "images_seen": total * a.data.global_batch_size,
        "world_size": params.launch.nproc_per_node * params.launch.nnodes,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "params": {"adapt": params_record(a)},
    }
    metrics = write_training_reports("adapt", params, run_dir, total, export_dir, ["teacher_backbone.pth", "full.pth"],
                                     metrics, n_prototypes=prototypes, embed_dim=teacher.embed_dim)
    low = knn.get("at_pretrain_size", {})
    log.info("adapt: %d -> %d px, %d iterations, loss %.3f -> %.3f, k-NN top-1 at %d px %s (random init %s), at %d px "
             "%s (before adaptation %s) (%.0f s)", old_bb.img_size, bb.img_size, metrics.get("iterations", 0),
             metrics.get("loss_start_mean", float("nan")), metrics.get("loss_end_mean", float("nan")), bb.img_size,
             knn.get("teacher_top1"), knn.get("random_init_top1"), old_bb.img_size, low.get("teacher_top1"),
             low.get("pretrain_teacher_top1"), metrics["wall_seconds"])
    return metrics
