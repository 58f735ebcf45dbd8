"""DINO / iBOT projection heads.

The head maps a backbone token to K prototype scores: an MLP (Linear-GELU x (nlayers-1), then Linear to a
bottleneck), L2 normalisation, and a bias-free weight-normalised linear layer (the prototypes). Parameter names match
the reference checkpoints (``mlp.0.weight`` ... ``last_layer.weight_g``, ``last_layer.weight_v``; the latter two are
the names ``torch.nn.utils.weight_norm`` produces). Checkpoints saved with the newer
``torch.nn.utils.parametrizations.weight_norm`` (``last_layer.parametrizations.weight.original0/1``) load too.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (row-wise), g of shape (out, 1).

    Written out instead of using ``torch.nn.utils.weight_norm`` (deprecated) or the parametrization API (different
    state-dict keys), so the checkpoint keys stay ``weight_g`` / ``weight_v``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_g = nn.Parameter(torch.empty(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default
        nn.init.ones_(self.weight_g)

    @property
    def weight(self) -> Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        aliases = {
            prefix + "parametrizations.weight.original0": prefix + "weight_g",
            prefix + "parametrizations.weight.original1": prefix + "weight_v",
        }
        for old, new in aliases.items():
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        if prefix + "weight" in state_dict and prefix + "weight_v" not in state_dict:
            w = state_dict.pop(prefix + "weight")  # a plain Linear: g = ||w|| reproduces it exactly
            state_dict[prefix + "weight_v"] = w
            state_dict[prefix + "weight_g"] = w.norm(dim=1, keepdim=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight_norm=True"


def _build_mlp(
    nlayers: int,
    in_dim: int,
    bottleneck_dim: int,
    hidden_dim: int | None = None,
    use_bn: bool = False,
    bias: bool = True,
) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in itertools.pairwise(dims):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """Projection head (DINO, Caron et al. 2021; DINOv2 Sec. 3 'Image-level objective')."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(
            nlayers, in_dim, bottleneck_dim, hidden_dim=hidden_dim, use_bn=use_bn, bias=mlp_bias
        )
        self.mlp.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # fp16 cannot represent 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


class DinoIbotHeads(NamedTuple):
    """The two heads of a DINOv2 student or teacher; ``ibot_head is dino_head`` when tied."""

    dino_head: DINOHead
    ibot_head: DINOHead

    @property
    def tied(self) -> bool:
        return self.ibot_head is self.dino_head

    def as_module_dict(self) -> dict[str, nn.Module]:
        """Entries for an ``nn.ModuleDict`` (the official layout: no ``ibot_head`` key when tied)."""
        if self.tied:
            return {"dino_head": self.dino_head}
        return {"dino_head": self.dino_head, "ibot_head": self.ibot_head}


def build_dino_ibot_heads(
    in_dim: int,
    *,
    dino_out_dim: int = 65536,
    dino_hidden_dim: int = 2048,
    dino_bottleneck_dim: int = 256,
    dino_nlayers: int = 3,
    ibot_out_dim: int | None = None,
    ibot_hidden_dim: int | None = None,
    ibot_bottleneck_dim: int | None = None,
    ibot_nlayers: int | None = None,
    separate_head: bool = True,
) -> DinoIbotHeads:
    """Build the DINO head and the iBOT head.

    Untied by default: the DINOv2 paper (Sec. 4, "Untying head weights between both objectives") reports that
    separate heads work better at scale, and the released ViT-L/g training configs set ``ibot.separate_head``.
    iBOT settings default to the DINO ones.
    """
    dino = DINOHead(
        in_dim,
        dino_out_dim,
        nlayers=dino_nlayers,
        hidden_dim=dino_hidden_dim,
        bottleneck_dim=dino_bottleneck_dim,
    )
    if not separate_head:
        return DinoIbotHeads(dino, dino)
    ibot = DINOHead(
        in_dim,
        ibot_out_dim if ibot_out_dim is not None else dino_out_dim,
        nlayers=ibot_nlayers if ibot_nlayers is not None else dino_nlayers,
        hidden_dim=ibot_hidden_dim if ibot_hidden_dim is not None else dino_hidden_dim,
        bottleneck_dim=ibot_bottleneck_dim if ibot_bottleneck_dim is not None else dino_bottleneck_dim,
    )
    return DinoIbotHeads(dino, ibot)


__all__ = ["DINOHead", "DinoIbotHeads", "WeightNormLinear", "build_dino_ibot_heads"]
