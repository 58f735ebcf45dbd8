"""Exports of a training run in the official format: backbone state dicts that load with ``strict=True`` into the
``dinov2_core.hub`` constructors (and Meta's), a full checkpoint with heads to continue from, and ``model.json``
that spells out the hub call, file hashes and sizes."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from .checkpoint import atomic_save


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sub_state(full: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``full`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


def write_model_json(export_dir: Path, backbone_cfg, files: dict[str, Path], extra: dict[str, Any]) -> dict[str, Any]:
    hub_name, hub_kwargs = backbone_cfg.hub_spec()
    info = {
        "format": "dinov2-official-state-dict",
        "hub": {"constructor": f"dinov2_core.hub.{hub_name}", "kwargs": hub_kwargs},
        "backbone": backbone_cfg.as_dict(),
        # paths relative to this file: the export folder stays valid wherever DVC / S3 puts it
        "files": {name: {"path": os.path.relpath(p, export_dir), "sha256": sha256_file(p), "bytes": p.stat().st_size}
                  for name, p in files.items()},
        **extra,
    }
    atomic_write_text(export_dir / "model.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def export_ssl(full: dict[str, Any], export_dir: Path, step: int, backbone_cfg, loss_cfg, crops, optim_cfg,
               stage: str) -> dict[str, Any]:
    """Pre-training / adaptation exports: the teacher backbone in the official format, and a full checkpoint
    (student + teacher with heads, loss centres, configs) for continued training. ``crops`` is a dataclass."""
    export_dir.mkdir(parents=True, exist_ok=True)
    teacher, student = sub_state(full, "teacher."), sub_state(full, "student.")
    backbone = sub_state(teacher, "backbone.")
    atomic_save(backbone, export_dir / "teacher_backbone.pth")
    config = {"stage": stage, "step": int(step), "backbone": backbone_cfg.as_dict(), "loss": loss_cfg.as_dict(),
              "crops": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(crops).items()},
              "optim": optim_cfg.as_dict()}
    atomic_save({"teacher": teacher, "student": student, "dino_loss_center": full["dino_loss.center"],
                 "ibot_patch_loss_center": full["ibot_patch_loss.center"], "config": config},
                export_dir / "full.pth")
    n_params = int(sum(v.numel() for v in backbone.values()))
    write_model_json(export_dir, backbone_cfg,
                     {"teacher_backbone.pth": export_dir / "teacher_backbone.pth", "full.pth": export_dir / "full.pth"},
                     {"stage": stage, "step": int(step), "backbone_parameters": n_params})
    return {"step": int(step), "backbone_parameters": n_params,
            "exports": {"teacher_backbone": str(export_dir / "teacher_backbone.pth"),
                        "full": str(export_dir / "full.pth"), "model_json": str(export_dir / "model.json")}}


__all__ = ["export_ssl", "sha256_file", "sub_state", "write_model_json"]
