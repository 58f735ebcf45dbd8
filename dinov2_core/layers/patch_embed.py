"""Patch embedding: a strided convolution that turns an image into a sequence of patch tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def make_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ValueError(f"expected a pair, got {x!r}")
        return x
    if not isinstance(x, int):
        raise TypeError(f"expected int or pair of ints, got {type(x).__name__}")
    return (x, x)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D).

    ``img_size`` only fixes ``num_patches`` (the size of the learned positional table); inputs of any size that
    is a multiple of the patch size are accepted and the model interpolates the positional table.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = make_2tuple(img_size)
        self.patch_size = make_2tuple(patch_size)
        self.patches_resolution = (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ph, pw = self.patch_size
        if not torch.jit.is_tracing() and (h % ph or w % pw):  # a traced (ONNX) graph cannot keep a Python check
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        x = self.proj(x)
        gh, gw = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))
        if not self.flatten_embedding:
            x = x.reshape(-1, gh, gw, self.embed_dim)
        return x

    def flops(self) -> float:
        """Multiply-accumulates of the projection at ``img_size`` (kept for API parity with the official layer)."""
        gh, gw = self.patches_resolution
        n = gh * gw * self.embed_dim * self.in_chans * self.patch_size[0] * self.patch_size[1]
        if not isinstance(self.norm, nn.Identity):
            n += gh * gw * self.embed_dim
        return float(n)


__all__ = ["PatchEmbed", "make_2tuple"]
