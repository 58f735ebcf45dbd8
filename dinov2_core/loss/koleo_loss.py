"""KoLeo regulariser (Sablayrolles et al. 2019, "Spreading vectors for similarity search"; DINOv2 Sec. 3).

L = -1/n sum_i log(d_i), d_i the Euclidean distance of the L2-normalised x_i to its nearest neighbour in the
batch. It pushes features in a batch apart (a differential entropy estimate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KoLeoLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # eps is added to the difference vector before the norm (as nn.PairwiseDistance does): identical vectors get
        # a distance of eps * sqrt(D) > 0 instead of 0, so both the log and the norm's gradient stay finite.
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    @staticmethod
    def pairwise_NNs_inner(x: Tensor) -> Tensor:
        """Index of each row's nearest neighbour (excluding itself) for L2-normalised rows, via the largest dot
        product (fills the diagonal with -1, below any off-diagonal cosine)."""
        dots = x @ x.t()
        n = x.shape[0]
        dots.view(-1)[:: n + 1].fill_(-1)
        return dots.argmax(dim=1)

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        """student_output: (B, D) with B >= 2 (one vector has no neighbour)."""
        if student_output.shape[0] < 2:
            raise ValueError("KoLeo needs at least 2 vectors")
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            with torch.no_grad():
                idx = self.pairwise_NNs_inner(x)
            distances = self.pdist(x, x[idx])
            return -torch.log(distances + eps).mean()
