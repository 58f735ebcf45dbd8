"""DINO image-level loss (DINOv2 Sec. 3 "Image-level objective"): cross-entropy between the centred, sharpened
teacher distribution of one global crop and the student distribution of every *other* crop."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._center import AsyncCenter
from ._dist import sinkhorn_knopp


class DINOLoss(AsyncCenter):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__((1, out_dim), center_momentum)
        self.student_temp = student_temp

    # ---------------------------------------------------------------------------------------------- teacher
    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> Tensor:
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations)

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output: Tensor) -> None:
        self.start_center_update(torch.sum(teacher_output, dim=0, keepdim=True), len(teacher_output))

    # ---------------------------------------------------------------------------------------------- loss
    def forward(
        self, student_output_list: Sequence[Tensor], teacher_out_softmaxed_centered_list: Sequence[Tensor]
    ):
        """Sum over all (student, teacher) pairs given of the batch-mean cross-entropy. Pairing (which views are
        excluded) is the caller's choice; :meth:`multicrop_loss` implements the DINOv2 one."""
        total = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total = total - torch.sum(t * lsm, dim=-1).mean()
        return total

    def multicrop_loss(
        self,
        student_global: Tensor,
        teacher_global: Tensor,
        student_local: Tensor | None = None,
        n_global_crops: int = 2,
    ) -> tuple[Tensor, Tensor]:
        """DINO loss of a multi-crop step, normalised by the number of loss terms.

        student_global: (n_global * B, K) student logits, crop-major (crop 0 of every image, then crop 1, ...).
        teacher_global: (n_global * B, K) teacher *probabilities* (after centering), same order.
        student_local: (n_local * B, K) student logits or None.
        Every student global crop is compared with every teacher global crop except its own view; every local crop
        with every teacher global crop. Returns (global_term, local_term); their sum is the DINO loss.
        """
        t_chunks = teacher_global.chunk(n_global_crops)
        s_chunks = student_global.chunk(n_global_crops)
        n_local = 0 if student_local is None else student_local.shape[0] // t_chunks[0].shape[0]
        n_terms = n_global_crops * (n_global_crops - 1) + n_global_crops * n_local
        n_terms = max(n_terms, 1)
        global_term = student_global.new_zeros(())
        for i, s in enumerate(s_chunks):
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for j, t in enumerate(t_chunks):
                if i != j:
                    global_term = global_term - torch.sum(t * lsm, dim=-1).mean()
        local_term = student_global.new_zeros(())
        if n_local:
            local_term = self.forward(student_local.chunk(n_local), t_chunks)
        return global_term / n_terms, local_term / n_terms
