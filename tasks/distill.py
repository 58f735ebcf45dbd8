"""The `distill` stage: a frozen big teacher distilled into a smaller student (paper Sec. 5, "Model distillation").

Teacher: `distill.teacher` is either a full checkpoint of this pipeline (default: the adapted model, backbone + DINO
and iBOT heads + configs) or any official-format backbone `.pth` (local or s3://; then `distill.teacher_model`
describes its architecture and the heads are seeded random projections, kept frozen). Student: `distill.student`.
Same losses as pre-training against the frozen teacher's outputs, no masking and no stochastic depth, iBOT on every
patch of the two global crops, and an EMA of the student that is exported as the result
(`data/distill/export/student_backbone.pth`, official format; `model.json` gives the hub call).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from dinov2_core.config import BackboneConfig, LossConfig
from dinov2_core.eval.monitor import knn_monitor, random_backbone
from dinov2_core.hub import extract_backbone_state_dict, load_checkpoint, load_export
from dinov2_core.models import build_backbone
from dinov2_core.train.checkpoint import atomic_save
from dinov2_core.train.distill_meta_arch import DistillMetaArch
from dinov2_core.train.engine import TrainSpec
from dinov2_core.train.export import sub_state, write_model_json
from tasks.log import get_logger
from tasks.params import Params, ParamsError, params_record
from tasks.stages import DistillParams
from tasks.storage import Storage, scheme_of
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

log = get_logger("distill")


def load_teacher(d: DistillParams, params: Params) -> tuple[dict[str, Any], Any, Any | None, str]:
    """(teacher state: ``backbone.*`` [+ heads], its BackboneConfig, its LossConfig or None, content sha256)."""
    opener = None if scheme_of(d.teacher) == "local" else Storage.from_params(params.storage).open_read
    if opener is None and not Path(d.teacher).exists():
        raise FileNotFoundError(f"{d.teacher}: teacher checkpoint not found (run adapt, or set distill.teacher)")
    ckpt = load_checkpoint(d.teacher, opener=opener)
    h = hashlib.sha256()
    if opener is None:
        with open(d.teacher, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(d.teacher.encode())
    if isinstance(ckpt, dict) and {"teacher", "config"} <= set(ckpt):
        bb = BackboneConfig.from_dict(ckpt["config"]["backbone"])
        return dict(ckpt["teacher"]), bb, LossConfig.from_dict(ckpt["config"]["loss"]), h.hexdigest()
    backbone = extract_backbone_state_dict(ckpt)
    if d.teacher_model is None:
        raise ParamsError("distill.teacher_model: required when distill.teacher is a bare backbone .pth "
                          "(give its arch, patch_size, depth...)")
    n_patches = backbone["pos_embed"].shape[1] - 1
    img_size = round(math.sqrt(n_patches)) * d.teacher_model.patch_size
    bb = replace(d.teacher_model, img_size=img_size)
    return {f"backbone.{k}": v for k, v in backbone.items()}, bb, None, h.hexdigest()


def distill_loss_config(d: DistillParams, teacher_loss):
    """The distillation losses from params; head shapes from the teacher's checkpoint when it has heads (the
    student's heads must predict over the same prototypes)."""
    loss = d.loss
    if teacher_loss is not None:
        loss = replace(loss, dino_head=teacher_loss.dino_head, ibot_head=teacher_loss.ibot_head,
                       ibot_separate_head=teacher_loss.ibot_separate_head)
    return loss


def teacher_backbone(state: dict[str, Any], bb):
    model = build_backbone(bb, with_drop_path=False)
    model.load_state_dict(sub_state(state, "backbone."), strict=True)
    return model.eval()


def build_spec(params: Params) -> TrainSpec:
    d = params.distill
    t_state, t_bb, t_loss, t_sha = load_teacher(d, params)
    s_bb = replace(d.student, img_size=d.crops.global_crops_size)
    loss = distill_loss_config(d, t_loss)
    optim = d.optim
    _, index_sha = read_shard_index_table(d.data.shards, params)

    def export(full: dict[str, Any], export_dir: Path, step: int) -> dict[str, Any]:
        export_dir.mkdir(parents=True, exist_ok=True)
        ema = sub_state(full, "student_ema.backbone.")
        atomic_save(ema, export_dir / "student_backbone.pth")
        config = {"stage": "distill", "step": int(step), "backbone": s_bb.as_dict(), "loss": loss.as_dict(),
                  "teacher_backbone": t_bb.as_dict(), "teacher": d.teacher, "crops": params_record(d.crops),
                  "optim": optim.as_dict()}
        atomic_save({"model": ema, "student": sub_state(full, "student."), "config": config}, export_dir / "full.pth")
        n_params = int(sum(v.numel() for v in ema.values()))
        write_model_json(export_dir, s_bb, {"student_backbone.pth": export_dir / "student_backbone.pth",
                                            "full.pth": export_dir / "full.pth"},
                         {"stage": "distill", "step": int(step), "backbone_parameters": n_params,
                          "result": "EMA of the student (paper Sec. 5)"})
        return {"step": int(step), "backbone_parameters": n_params,
                "teacher_parameters": int(sum(v.numel() for k, v in t_state.items() if k.startswith("backbone."))),
                "exports": {"student_backbone": str(export_dir / "student_backbone.pth"),
                            "full": str(export_dir / "full.pth"), "model_json": str(export_dir / "model.json")}}

    return TrainSpec(
        stage="distill",
        out=Path(d.out),
        build=lambda: DistillMetaArch(s_bb, t_bb, loss, n_local_crops=d.crops.local_crops_number,
                                      teacher_state=t_state, head_seed=params.seed),
        init_fresh=lambda meta: None,
        export=export,
        data=d.data, crops=d.crops, loss=loss, optim=optim,
        code_files=stage_code(__file__),
        monitor=d.monitor,
        monitor_part="student_ema",
        checkpoint_every=d.checkpoint.every, checkpoint_keep=d.checkpoint.keep,
        checkpoint_dir=d.checkpoint.dir,
        digest_payload={"distill": d.model_dump(mode="json", exclude={"checkpoint", "monitor", "out"}),
                        "teacher_sha256": t_sha, "shards_index_sha256": index_sha, "seed": params.seed},
        mask_student=False,
        exclude_from_checkpoint=("teacher.",),  # frozen: reloaded from distill.teacher, not copied into every save
        export_parts=("student", "student_ema"),
        seed=params.seed,
        extra_summary={"teacher_has_trained_heads": t_loss is not None},
    )


def run_distill(params: Params) -> dict[str, Any]:
    started = time.perf_counter()
    d = params.distill
    check_crops("distill", d.crops, d.student.patch_size)
    check_batch("distill", d.data, params.launch)
    t_state, t_bb, t_loss, _ = load_teacher(d, params)
    if t_bb.patch_size != d.student.patch_size:
        raise ParamsError(f"distill.student.patch_size: {d.student.patch_size} differs from the teacher's "
                          f"{t_bb.patch_size} (the patch-level loss needs the same grid)")
    index, _ = read_shard_index_table(d.data.shards, params)
    validate_stage("distill-input", shard_index_checks(index, d.data.global_batch_size), params.reports)

    run_dir = launch_workers("distill", params, Path(d.out))
    if not is_main_node(params.launch):
        return {"node_rank": params.launch.node_rank}  # node 0 reports the run
    export_dir = Path(d.out) / "export"
    summary = json.loads((export_dir / "summary.json").read_text())
    s_bb = replace(d.student, img_size=d.crops.global_crops_size)
    models = {"teacher": teacher_backbone(t_state, t_bb),
              "student_ema": load_export(export_dir / "model.json", "student_backbone.pth"),
              "random_init": random_backbone(s_bb, params.seed)}
    del t_state
    knn = knn_monitor(d.monitor, models, d.crops.global_crops_size, s_bb.patch_size)
    total = d.optim.epochs * d.optim.epoch_length
    metrics = {
        "summary": summary,
        "knn": knn,
        "teacher": {"path": d.teacher, "backbone": t_bb.as_dict(), "has_trained_heads": t_loss is not None},
        "images_seen": total * d.data.global_batch_size,
        "world_size": params.launch.nproc_per_node * params.launch.nnodes,
        "wall_seconds": round(time.perf_counter() - started, 2),
        "params": {"distill": params_record(d)},
    }
    metrics = write_training_reports("distill", params, run_dir, total, export_dir,
                                     ["student_backbone.pth", "full.pth"], metrics,
                                     n_prototypes=prototype_counts(distill_loss_config(d, t_loss)),
                                     embed_dim=models["student_ema"].embed_dim)
    log.info("distill: %d iterations, loss %.3f -> %.3f, k-NN top-1 student EMA %s vs teacher %s vs random init %s, "
             "CKA(student, teacher) %s (%.0f s)", metrics.get("iterations", 0),
             metrics.get("loss_start_mean", float("nan")), metrics.get("loss_end_mean", float("nan")),
             knn.get("student_ema_top1"), knn.get("teacher_top1"), knn.get("random_init_top1"),
             knn.get("student_ema_cka_vs_teacher"), metrics["wall_seconds"])
    return metrics
