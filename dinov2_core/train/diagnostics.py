"""Telling a run that learns from one that does not (DINO paper Sec. 5.3: collapse; DINOv2 Sec. 3).

Two failure modes look alike in a loss curve: *uniform collapse*, where the teacher's targets are uniform over the
K prototypes (the DINO loss sits at ln K and the student is asked to predict nothing), and *feature collapse*, where
every image maps to the same point. ``learning_diagnostics`` measures both in every step; ``learning_warnings``
turns the end of a run into one-line verdicts that name the likely causes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DIAGNOSTIC_KEYS = ("teacher_entropy_dino", "teacher_entropy_ibot", "student_entropy_dino", "cls_std")
NO_SIGNAL_TOLERANCE = 0.01  # DINO loss within 1% of ln K: no learning signal
COLLAPSE_FRACTION = 0.25  # cls_std below a quarter of 1 / sqrt(D) (the value for features spread over the sphere)


@torch.no_grad()
def mean_entropy(probs: Tensor) -> Tensor:
    """Mean over rows of the entropy (nats) of each row's distribution."""
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    p = probs.float()
    return -(p * p.clamp_min(1e-12).log()).sum(-1).mean()


@torch.no_grad()
def learning_diagnostics(student_global_logits: Tensor, student_temp: float, dino_targets: Tensor,
                         ibot_targets: Tensor, global_cls: Tensor) -> dict[str, Tensor]:
    """Per-step statistics (no gradient):

    * ``teacher_entropy_dino`` / ``_ibot``: entropy of the centred teacher targets; ln K means uniform targets;
    * ``student_entropy_dino``: entropy of the student's prediction (the DINO loss minus the teacher entropy is the
      student/teacher KL gap);
    * ``cls_std``: per-dimension std of the L2-normalised student CLS tokens, averaged over dimensions: about
      1/sqrt(D) for features spread over the sphere, towards 0 when every image maps to the same point.
    """
    s = torch.softmax(student_global_logits.float() / student_temp, dim=-1)
    cls = F.normalize(global_cls.float(), dim=-1)
    return {
        "teacher_entropy_dino": mean_entropy(dino_targets),
        "teacher_entropy_ibot": mean_entropy(ibot_targets),
        "student_entropy_dino": mean_entropy(s),
        "cls_std": cls.std(dim=0).mean() if cls.shape[0] > 1 else cls.new_zeros(()),
    }


def learning_warnings(stage: str, *, dino_loss_end: float | None, n_prototypes: int, cls_std_end: float | None,
                      embed_dim: int) -> list[str]:
    """One-line verdicts on the end of a run (means over its last iterations); empty when it looks healthy."""
    out = []
    ln_k = math.log(n_prototypes)
    if dino_loss_end is not None and math.isfinite(dino_loss_end) and dino_loss_end >= ln_k * (1 - NO_SIGNAL_TOLERANCE):
        out.append(
            f"{stage}: no learning signal: the DINO loss ended at {dino_loss_end:.3f}, not {NO_SIGNAL_TOLERANCE:.0%} "
            f"below ln K = {ln_k:.3f} ({n_prototypes} prototypes), so the teacher's targets are near uniform; likely causes: a teacher temperature too high for the head's logit spread "
            "(optim.teacher_temp), LayerScale 1e-5 muting the CLS token early (model.layerscale), or too few iterations")
    ref = 1.0 / math.sqrt(embed_dim)
    if cls_std_end is not None and math.isfinite(cls_std_end) and cls_std_end < COLLAPSE_FRACTION * ref:
        out.append(
            f"{stage}: feature collapse: the per-dimension std of the normalised CLS features ended at "
            f"{cls_std_end:.4f}, below {COLLAPSE_FRACTION:g} x 1/sqrt(D) = {COLLAPSE_FRACTION * ref:.4f}: images map "
            "to nearly one point; likely causes: LayerScale 1e-5 still muting every residual branch early in a short "
            "run (model.layerscale), KoLeo off or too weak (loss.koleo_loss_weight), or a learning rate too high")
    return out


__all__ = ["DIAGNOSTIC_KEYS", "learning_diagnostics", "learning_warnings", "mean_entropy"]
