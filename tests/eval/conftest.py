"""Stand-in backbones with the official DINOv2 feature API, small enough for CPU unit tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyViT(nn.Module):
    """A few residual token-mixing blocks behind a patch embedding; same API as DinoVisionTransformer."""

    def __init__(
        self, patch_size: int = 14, embed_dim: int = 16, depth: int = 5, num_register_tokens: int = 1
    ):
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_register_tokens = num_register_tokens
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.register_tokens = nn.Parameter(torch.randn(1, num_register_tokens, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, embed_dim), nn.GELU())
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)

    def _tokens(self, x):
        p = self.patch_embed(x).flatten(2).transpose(1, 2)
        b = x.shape[0]
        return torch.cat([self.cls_token.expand(b, -1, -1), self.register_tokens.expand(b, -1, -1), p], 1)

    def _run(self, x):
        t = self._tokens(x)
        outs = []
        for blk in self.blocks:
            t = t + blk(t) + 0.1 * t.mean(1, keepdim=True)
            outs.append(t)
        return outs

    def forward_features(self, x, masks=None):
        t = self.norm(self._run(x)[-1])
        r = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": t[:, 0],
            "x_norm_regtokens": t[:, 1:r],
            "x_norm_patchtokens": t[:, r:],
            "x_prenorm": t,
            "masks": masks,
        }

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        outs = self._run(x)
        idx = range(len(outs) - n, len(outs)) if isinstance(n, int) else n
        outs = [outs[i] for i in idx]
        if norm:
            outs = [self.norm(o) for o in outs]
        r = 1 + self.num_register_tokens
        cls = [o[:, 0] for o in outs]
        patches = [o[:, r:] for o in outs]
        if reshape:
            b, _, h, w = x.shape
            patches = [
                p.reshape(b, h // self.patch_size, w // self.patch_size, -1).permute(0, 3, 1, 2)
                for p in patches
            ]
        return tuple(zip(patches, cls)) if return_class_token else tuple(patches)

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return TinyViT()


@pytest.fixture
def tiny_vit_cls():
    return TinyViT
