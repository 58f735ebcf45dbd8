"""Distillation of a big frozen teacher into a smaller student (DINOv2 paper Sec. 5, "Model distillation").

The paper reuses the training loop with four changes, all made here:
* the teacher is a larger, *frozen* pre-trained model (its backbone and, when the checkpoint has them, its DINO/iBOT
  heads; a backbone-only official ``.pth`` gets seeded random heads that stay frozen);
* masking and stochastic depth are removed (the student sees unmasked crops and has no drop-path);
* the iBOT loss is applied on the two global crops: every patch of the student's global crops is compared with the
  teacher's patch distribution at the same position (student and teacher must share the patch size);
* a spare EMA of the student is kept, and it is the result.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..config import BackboneConfig, LossConfig
from ..models import build_backbone
from .ema import ema_update_
from .ssl_meta_arch import SSLMetaArch, build_heads

logger = logging.getLogger("dinov2.train")


class DistillMetaArch(SSLMetaArch):
    """``student`` (trained), ``teacher`` (frozen, given), ``student_ema`` (the exported result)."""

    def __init__(self, student: BackboneConfig, teacher: BackboneConfig, loss: LossConfig, n_local_crops: int = 8,
                 teacher_state: Mapping[str, torch.Tensor] | None = None, head_seed: int = 0) -> None:
        nn.Module.__init__(self)
        if student.patch_size != teacher.patch_size:
            raise ValueError(f"student patch size {student.patch_size} != teacher patch size {teacher.patch_size}: "
                             "the patch-level (iBOT) loss needs the same patch grid")
        self.backbone_cfg, self.teacher_cfg, self.loss_cfg = student, teacher, loss
        self.n_global_crops, self.n_local_crops = 2, n_local_crops
        self.compute_dtype = None


        student_backbone = build_backbone(replace(student, drop_path_rate=0.0), with_drop_path=False)
        student_backbone.mask_token.requires_grad_(False)  # the student is never masked: not a trained parameter
        self.embed_dim = student_backbone.embed_dim
        self.student = nn.ModuleDict({"backbone": student_backbone, **build_heads(self.embed_dim, loss)})
        teacher_backbone = build_backbone(teacher, with_drop_path=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed)
            teacher_heads = build_heads(teacher_backbone.embed_dim, loss)
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, **teacher_heads})
        self.teacher_has_trained_heads = False
        if teacher_state is not None:
            self.load_teacher(teacher_state)
        for p in self.teacher.parameters():
            p.requires_grad = False
        ema_backbone = build_backbone(replace(student, drop_path_rate=0.0), with_drop_path=False)
        ema_backbone.load_state_dict(student_backbone.state_dict())
        self.student_ema = nn.ModuleDict({"backbone": ema_backbone})
        for p in self.student_ema.parameters():
            p.requires_grad = False
        self._init_losses(loss)

    def load_teacher(self, state: Mapping[str, torch.Tensor]) -> None:
        """``state``: teacher keys ``backbone.*`` (+ ``dino_head.*`` / ``ibot_head.*``), or a bare backbone state
        dict with the official keys. Loaded strictly; missing heads keep their frozen random init."""
        if not any(k.startswith("backbone.") for k in state):
            state = {f"backbone.{k}": v for k, v in state.items()}
        head_keys = {k for k in self.teacher.state_dict() if not k.startswith("backbone.")}
        has_heads = any(k in state for k in head_keys)
        missing, unexpected = self.teacher.load_state_dict(dict(state), strict=False)
        missing = [k for k in missing if k.startswith("backbone.") or has_heads]
        if missing or unexpected:
            raise ValueError(f"teacher checkpoint does not match the teacher architecture: missing {missing[:3]}, "
                             f"unexpected {list(unexpected)[:3]}")
        self.teacher_has_trained_heads = has_heads
        if not has_heads:
            logger.warning("distill: the teacher checkpoint has no DINO/iBOT heads; using frozen random heads")

    # ------------------------------------------------------------------------------------------------ step
    def train(self, mode: bool = True) -> DistillMetaArch:
        nn.Module.train(self, mode)
        self.teacher.eval()
        self.student_ema.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """The teacher is frozen: the EMA goes to the spare copy of the student backbone."""
        ema_update_(self.student_ema["backbone"], self.student["backbone"], momentum)

    @staticmethod
    def prepare_batch(batch: dict[str, Any]) -> dict[str, Any]:
        """No masking for the student; the patch loss covers every patch of both global crops."""
        g = batch["collated_global_crops"]
        n_rows = g.shape[0]
        n_tokens = batch["collated_masks"].shape[1]
        masks = torch.ones(n_rows, n_tokens, dtype=torch.bool, device=g.device)
        out = dict(batch)
        out.update(
            student_masks=None,
            collated_masks=masks,
            loss_masks=masks,
            mask_indices_list=torch.arange(n_rows * n_tokens, device=g.device),
            masks_weight=torch.full((n_rows * n_tokens,), 1.0 / n_tokens, device=g.device),
            n_masked_patches=torch.full((1,), n_rows * n_tokens, dtype=torch.long, device=g.device),
        )
        return out

    def forward_backward(self, batch: dict[str, Any], teacher_temp: float, backward: bool = True,
                         loss_hook=None) -> dict[str, torch.Tensor]:
        return super().forward_backward(self.prepare_batch(batch), teacher_temp, backward, loss_hook)


__all__ = ["DistillMetaArch"]
