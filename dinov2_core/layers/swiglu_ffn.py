"""SwiGLU feed-forward network (used by ViT-g/14, DINOv2 paper Sec. 5 / Table 14)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_hidden_features(hidden_features: int) -> int:
    """Hidden width of the 'fused' SwiGLU: 2/3 of the MLP width rounded up to a multiple of 8.

    This keeps the parameter count of SwiGLU close to the GELU MLP it replaces; for ViT-g
    (dim 1536, mlp_ratio 4) it gives 4096, the width of the released ViT-g/14 checkpoints.
    """
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """silu(x W1) * (x W2) W3 with W1 and W2 stored as one matrix ``w12`` (the checkpoint layout)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class SwiGLUFFNFused(SwiGLUFFN):
    """SwiGLU whose ``hidden_features`` argument is the *MLP* width; it is shrunk by :func:`swiglu_hidden_features`.

    'Fused' refers to the single w12 projection; the computation is plain PyTorch (xformers' fused kernel is not
    required and gives the same numbers).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        hidden_features = swiglu_hidden_features(hidden_features or in_features)
        super().__init__(
            in_features, hidden_features, out_features, act_layer=act_layer, drop=drop, bias=bias
        )
