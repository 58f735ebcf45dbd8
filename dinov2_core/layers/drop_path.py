"""Stochastic depth.

Two forms: the classic per-sample mask (``DropPath``), and the DINOv2 variant (paper Sec. 5, "Efficient stochastic
depth") that gathers the kept samples, evaluates the residual branch on them only, and scatters it back scaled by
``B / kept``. The second saves the branch's compute for dropped samples, which matters at drop rates of 0.3-0.4.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float | None = None) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob or 0.0, self.training)


def kept_subset_size(batch: int, sample_drop_ratio: float) -> int:
    """Number of samples whose residual is computed: at least one, so the branch always gets gradients."""
    return max(int(batch * (1.0 - sample_drop_ratio)), 1)


def drop_add_residual_stochastic_depth(
    x: Tensor,
    residual_func: Callable[[Tensor], Tensor],
    sample_drop_ratio: float = 0.0,
) -> Tensor:
    """x + residual_func(x) on a random subset of the batch, rescaled so the expectation is unchanged."""
    b = x.shape[0]
    keep = kept_subset_size(b, sample_drop_ratio)
    idx = torch.randperm(b, device=x.device)[:keep]
    residual = residual_func(x[idx])
    return torch.index_add(x, 0, idx, residual.to(x.dtype), alpha=b / keep)
