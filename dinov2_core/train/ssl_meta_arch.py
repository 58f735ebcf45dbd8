"""DINOv2 self-distillation: a student and its EMA teacher, each a backbone with DINO and iBOT heads (paper Sec. 3).

One training step (``forward_backward``):
* the teacher sees the two global crops (unmasked) and gives, per crop, a centred and sharpened distribution over
  the DINO prototypes (CLS token) and over the iBOT prototypes (patch tokens at the positions the student has
  masked); centering is Sinkhorn-Knopp or softmax with an EMA centre, with the scheduled teacher temperature;
* the student sees every crop: global crops with iBOT masks and local crops, in one backbone call (packed into one
  token stream on GPU, one batch per crop size on CPU, where packing does not pay);
* loss = w_dino * DINO (every student crop vs every *other* teacher global crop) + w_ibot * iBOT (masked patches,
  each image weighted equally) + w_koleo * KoLeo (on the student's global CLS tokens, per crop, as in the official
  code: it is computed per rank, so it depends on how the global batch is split).

The meta-architecture is a plain ``nn.Module``; :mod:`dinov2_core.train.fsdp` shards it, :mod:`.loop` drives it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..config import BackboneConfig, LossConfig
from ..heads import build_dino_ibot_heads
from ..loss.dino_clstoken_loss import DINOLoss
from ..loss.ibot_patch_loss import iBOTPatchLoss
from ..loss.koleo_loss import KoLeoLoss
from ..models import build_backbone
from .diagnostics import DIAGNOSTIC_KEYS, learning_diagnostics
from .ema import ema_update_
from .param_groups import fuse_params_groups, get_params_groups_with_decay

LOSS_KEYS = ("total", "dino", "dino_global", "dino_local", "ibot", "koleo")


def build_heads(embed_dim: int, loss: LossConfig) -> dict[str, nn.Module]:
    heads = build_dino_ibot_heads(
        embed_dim,
        dino_out_dim=loss.dino_head.n_prototypes,
        dino_hidden_dim=loss.dino_head.hidden_dim,
        dino_bottleneck_dim=loss.dino_head.bottleneck_dim,
        dino_nlayers=loss.dino_head.nlayers,
        ibot_out_dim=loss.ibot_head.n_prototypes,
        ibot_hidden_dim=loss.ibot_head.hidden_dim,
        ibot_bottleneck_dim=loss.ibot_head.bottleneck_dim,
        ibot_nlayers=loss.ibot_head.nlayers,
        separate_head=loss.ibot_separate_head,
    )
    return heads.as_module_dict()


class SSLMetaArch(nn.Module):
    """Student + EMA teacher with untied (by default) DINO/iBOT heads and the three losses.

    ``self.student`` / ``self.teacher`` are ``nn.ModuleDict`` with ``backbone``, ``dino_head`` and (untied)
    ``ibot_head``: the official layout, so ``teacher.backbone.*`` keys are the released backbone keys.
    """

    def __init__(self, backbone: BackboneConfig, loss: LossConfig, n_local_crops: int = 8,
                 n_global_crops: int = 2) -> None:
        super().__init__()
        if n_global_crops != 2:
            raise ValueError("the DINOv2 recipe uses exactly 2 global crops")
        self.backbone_cfg = backbone
        self.loss_cfg = loss
        self.n_global_crops = n_global_crops
        self.n_local_crops = n_local_crops
        self.compute_dtype: torch.dtype | None = None  # bf16 autocast on GPU, None (float32) on CPU

        student_backbone = build_backbone(backbone, with_drop_path=True)
        teacher_backbone = build_backbone(backbone, with_drop_path=False)
        self.embed_dim = student_backbone.embed_dim
        self.student = nn.ModuleDict({"backbone": student_backbone, **build_heads(self.embed_dim, loss)})
        self.teacher = nn.ModuleDict({"backbone": teacher_backbone, **build_heads(self.embed_dim, loss)})
        self.teacher.load_state_dict(self.student.state_dict())  # the teacher starts as a copy of the student
        for p in self.teacher.parameters():
            p.requires_grad = False

        self._init_losses(loss)

    def _init_losses(self, loss: LossConfig) -> None:
        ibot_out = loss.ibot_head.n_prototypes if loss.ibot_separate_head else loss.dino_head.n_prototypes
        self.dino_loss = DINOLoss(loss.dino_head.n_prototypes, loss.student_temp, loss.center_momentum)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_out, loss.student_temp, loss.center_momentum)
        self.koleo_loss = KoLeoLoss()

    # ------------------------------------------------------------------------------------------------ setup
    @property
    def ibot_separate_head(self) -> bool:
        return "ibot_head" in self.student

    def train(self, mode: bool = True) -> SSLMetaArch:
        super().train(mode)
        self.teacher.eval()  # no dropout / drop-path in the teacher, ever
        return self

    def set_pack_sequences(self, pack: bool) -> None:
        """Pack multi-crop batches into one token stream (pays on GPU with xformers; per-size is faster on CPU)."""
        for module in self.modules():
            if hasattr(module, "pack_sequences"):
                module.pack_sequences = pack

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The student's sub-networks: what the optimizer updates and gradient clipping acts on."""
        return dict(self.student.items())

    def get_params_groups(self, layerwise_decay: float, patch_embed_lr_mult: float) -> list[dict[str, Any]]:
        """AdamW groups with layer-wise lr decay and no weight decay on biases/norms/LayerScale (App. B)."""
        groups: list[dict[str, Any]] = []
        for module in self.trainable_modules().values():
            per_param = get_params_groups_with_decay(module, layerwise_decay, patch_embed_lr_mult)
            for g in fuse_params_groups(per_param):
                g["foreach"] = True
                groups.append(g)
        return groups

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for key, student_module in self.student.items():
            ema_update_(self.teacher[key], student_module, momentum)

    @torch.no_grad()
    def flush_center_updates(self) -> None:
        """Fold pending (asynchronously reduced) centre updates in, so a checkpoint holds the current centres."""
        self.dino_loss.apply_center_update()
        self.ibot_patch_loss.apply_center_update()

    def _autocast(self, device: torch.device):
        if self.compute_dtype is None or device.type == "cpu":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    # ------------------------------------------------------------------------------------------------ teacher
    def _teacher_backbone_outputs(self, global_crops: Tensor) -> dict[str, Tensor]:
        return self.teacher["backbone"](global_crops, is_training=True)

    def _center(self, dino_logits: Tensor, ibot_logits: Tensor, n_masked_local: Tensor,
                teacher_temp: float) -> tuple[Tensor, Tensor]:
        """Teacher probabilities from logits: Sinkhorn-Knopp over all ranks, or softmax minus an EMA centre."""
        cfg = self.loss_cfg
        dino_logits, ibot_logits = dino_logits.float(), ibot_logits.float()
        if cfg.centering == "sinkhorn_knopp":
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(dino_logits, teacher_temp, n_iterations=cfg.sinkhorn_iterations)
            ibot_t = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                ibot_logits, teacher_temp, n_masked_patches_tensor=n_masked_local, n_iterations=cfg.sinkhorn_iterations
            )
            return dino_t, ibot_t
        dino_t = self.dino_loss.softmax_center_teacher(dino_logits, teacher_temp)
        self.dino_loss.update_center(dino_logits)
        ibot_t = self.ibot_patch_loss.softmax_center_teacher(ibot_logits.unsqueeze(0), teacher_temp).squeeze(0)
        # The centre is the mean over this rank's masked patches, averaged over ranks (official semantics). A rank
        # without masked patches would contribute the mean of nothing (NaN): it contributes the current centre.
        center_input = ibot_logits.unsqueeze(0) if ibot_logits.shape[0] else self.ibot_patch_loss.center.clone()
        self.ibot_patch_loss.update_center(center_input)
        return dino_t, ibot_t

    @torch.no_grad()
    def teacher_targets(self, batch: dict[str, Any], teacher_temp: float) -> tuple[Tensor, Tensor]:
        """(DINO targets (2B, K) crop-major, iBOT targets (M, K') at the student's masked patches)."""
        global_crops = batch["collated_global_crops"]
        out = self._teacher_backbone_outputs(global_crops)
        cls = out["x_norm_clstoken"]
        patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices_list"])
        dino_logits, ibot_logits = self._apply_heads(self.teacher, cls, patches)
        return self._center(dino_logits, ibot_logits, batch["n_masked_patches"], teacher_temp)

    @staticmethod
    def _apply_heads(heads: nn.ModuleDict, cls: Tensor, patches: Tensor) -> tuple[Tensor, Tensor]:
        """Each head runs once per step (one call per FSDP unit); a tied head takes CLS and patches together."""
        if "ibot_head" in heads:
            return heads["dino_head"](cls), heads["ibot_head"](patches)
        both = heads["dino_head"](torch.cat([cls, patches]))
        return both[: cls.shape[0]], both[cls.shape[0]:]

    # ------------------------------------------------------------------------------------------------ student
    def student_forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Student backbone on all crops, heads on the CLS tokens and on the masked global patches."""
        global_crops = batch["collated_global_crops"]
        local_crops = batch["collated_local_crops"]
        masks = batch.get("student_masks", batch["collated_masks"])
        backbone = self.student["backbone"]
        has_local = self.n_local_crops > 0 and local_crops.shape[0] > 0
        if has_local:
            g_out, l_out = backbone([global_crops, local_crops], masks=[masks, None], is_training=True)
            local_cls = l_out["x_norm_clstoken"]
        else:
            g_out = backbone(global_crops, masks=masks, is_training=True)
            local_cls = g_out["x_norm_clstoken"][:0]
        global_cls = g_out["x_norm_clstoken"]
        patches = g_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices_list"])
        n_g = global_cls.shape[0]
        cls_logits, patch_logits = self._apply_heads(self.student, torch.cat([global_cls, local_cls]), patches)
        return {
            "global_cls": global_cls,
            "global_logits": cls_logits[:n_g],
            "local_logits": cls_logits[n_g:] if has_local else None,
            "patch_logits": patch_logits,
        }

    # ------------------------------------------------------------------------------------------------ losses
    def compute_losses(self, student: dict[str, Tensor], dino_targets: Tensor, ibot_targets: Tensor,
                       batch: dict[str, Any]) -> dict[str, Tensor]:
        cfg = self.loss_cfg
        local_logits = student["local_logits"]
        dino_global, dino_local = self.dino_loss.multicrop_loss(
            student["global_logits"].float(),
            dino_targets,
            None if local_logits is None else local_logits.float(),
            n_global_crops=self.n_global_crops,
        )
        dino = dino_global + dino_local
        masks = batch.get("loss_masks", batch["collated_masks"])
        ibot = self.ibot_patch_loss.forward_masked(
            student["patch_logits"].float(),
            ibot_targets,
            student_masks_flat=masks,
            n_masked_patches=int(batch["mask_indices_list"].shape[0]),
            masks_weight=batch["masks_weight"],
        )
        # KoLeo within each global crop (never between the two crops of one image); undefined below 2 images.
        chunks = student["global_cls"].chunk(self.n_global_crops)
        if cfg.koleo_loss_weight > 0 and chunks[0].shape[0] >= 2:
            koleo = sum(self.koleo_loss(c) for c in chunks) / self.n_global_crops
        else:
            koleo = dino.new_zeros(())
        total = (cfg.dino_loss_weight * dino + cfg.ibot_loss_weight * ibot
                 + cfg.koleo_loss_weight * self.n_global_crops * koleo)
        diagnostics = learning_diagnostics(student["global_logits"], self.dino_loss.student_temp, dino_targets,
                                           ibot_targets, student["global_cls"])
        return {"total": total, "dino": dino, "dino_global": dino_global, "dino_local": dino_local,
                "ibot": ibot, "koleo": koleo, **diagnostics}

    def forward_backward(self, batch: dict[str, Any], teacher_temp: float, backward: bool = True,
                         loss_hook=None) -> dict[str, Tensor]:
        """One step's losses (detached, this rank's values); gradients are accumulated into the student.

        ``loss_hook(losses) -> losses`` may rewrite the loss before backward (fault injection in tests).
        """
        device = batch["collated_global_crops"].device
        with self._autocast(device):
            dino_t, ibot_t = self.teacher_targets(batch, teacher_temp)
            student = self.student_forward(batch)
        losses = self.compute_losses(student, dino_t, ibot_t, batch)
        if loss_hook is not None:
            losses = loss_hook(losses)
        if backward:
            losses["total"].backward()
        return {k: v.detach() for k, v in losses.items()}

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - use forward_backward
        raise NotImplementedError("call forward_backward(batch, teacher_temp)")


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def iter_student_params(meta: nn.Module) -> Iterable[Tensor]:
    for module in meta.trainable_modules().values():
        yield from module.parameters()


__all__ = ["DIAGNOSTIC_KEYS", "LOSS_KEYS", "SSLMetaArch", "batch_to_device", "build_heads", "iter_student_params"]
