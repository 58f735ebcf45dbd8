"""iBOT masked-image-modelling loss (DINOv2 Sec. 3 "Patch-level objective"): at the patches masked in the student's
input, cross-entropy between the teacher's (unmasked) patch distribution and the student's prediction."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._center import AsyncCenter
from ._dist import all_reduce_, sinkhorn_knopp


def _cross_entropy_terms(t: Tensor, s: Tensor, temp: float) -> Tensor:
    """sum_k t_k log softmax(s / temp)_k, in float32."""
    return torch.sum(t.float() * F.log_softmax(s.float() / temp, dim=-1), dim=-1)


class iBOTPatchLoss(AsyncCenter):
    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, 1, patch_out_dim), center_momentum)
        self.student_temp = student_temp

    # ---------------------------------------------------------------------------------------------- teacher
    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        self.apply_center_update()
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: Tensor,
        n_iterations: int = 3,
    ) -> Tensor:
        """teacher_output: (M, K) logits of the masked patches of this rank; ``n_masked_patches_tensor`` the local
        count (all-reduced here, on a copy, into the global count)."""
        n_total = torch.as_tensor(n_masked_patches_tensor, device=teacher_output.device).clone()
        all_reduce_(n_total)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations, n_samples=n_total)

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        self.reduce_center_update(teacher_patch_tokens)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens: Tensor) -> None:
        """teacher_patch_tokens: (B, N, K); the centre is the mean over tokens, then over the B rows."""
        self.start_center_update(
            torch.sum(teacher_patch_tokens.mean(1), dim=0, keepdim=True), len(teacher_patch_tokens)
        )

    # ---------------------------------------------------------------------------------------------- loss
    def forward(
        self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor, student_masks_flat: Tensor
    ) -> Tensor:
        """Dense form. student (B, N, K) logits, teacher (B, N, K) probabilities, masks (B, N) bool.
        Each image's loss is the mean over its masked patches; images are averaged."""
        loss = torch.sum(
            teacher_patch_tokens * F.log_softmax(student_patch_tokens / self.student_temp, dim=-1), dim=-1
        )
        m = student_masks_flat.float()
        loss = torch.sum(loss * m, dim=-1) / m.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Gathered form: only the M masked patches, (M, K) each (rows may be padded up to an upper bound; only the
        first ``n_masked_patches`` count). Every masked patch is weighted by 1 / (masked patches of its image), and
        the sum divided by the number of images B, so each image counts equally whatever its mask ratio and images
        without masks contribute 0."""
        loss = _cross_entropy_terms(
            teacher_patch_tokens_masked, student_patch_tokens_masked, self.student_temp
        )
        if masks_weight is None:
            per_image = 1.0 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]
