"""The teacher-centring EMA both DINO and iBOT use (softmax centering, DINO paper Sec. 3.1): the batch mean of the
teacher's logits is all-reduced *asynchronously* and only folded into the centre at the next
``softmax_center_teacher``, so the reduce overlaps the student's forward/backward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._dist import all_reduce_, world_size


class AsyncCenter(nn.Module):
    """Holds the ``center`` buffer (official checkpoint key) and its pending update."""

    def __init__(self, center_shape: tuple[int, ...], center_momentum: float) -> None:
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(*center_shape))
        self.updated = True
        self.reduce_handle = None
        self.pending_rows: int | None = None
        self.async_batch_center: Tensor | None = None

    @torch.no_grad()
    def start_center_update(self, batch_sum: Tensor, n_rows: int) -> None:
        """Launch the all-reduce of this rank's ``batch_sum`` over ``n_rows`` rows; applied lazily."""
        self.updated = False
        self.pending_rows = n_rows
        self.async_batch_center = batch_sum
        self.reduce_handle = all_reduce_(self.async_batch_center, async_op=True)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        if self.updated:
            return
        if self.reduce_handle is not None:
            self.reduce_handle.wait()
            self.reduce_handle = None
        batch_center = self.async_batch_center / (self.pending_rows * world_size())
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.updated = True
