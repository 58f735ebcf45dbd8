"""Baseline "backbones" exposing the DINOv2 feature API, so every protocol runs on them unchanged.

Random-init baseline: build the real architecture without loading weights — nothing extra is
needed here because all eval code only relies on forward_features / get_intermediate_layers /
patch_size / embed_dim.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class RawPixelBackbone(nn.Module):
    """Normalised pixels as features: a floor that any learned backbone should beat.

    CLS feature: the image, area-downsampled to cls_size x cls_size (None = full resolution), flattened.
    Patch tokens: each patch_size x patch_size pixel block flattened (embed_dim = 3 * p * p).
    It has a single "block": get_intermediate_layers(n) returns the same outputs n times, so
    multi-block linear-probe variants are valid but redundant (use n_last_blocks_grid=(1,) to save time).
    """

    def __init__(self, patch_size: int = 14, cls_size: int | None = 32):
        super().__init__()
        self.patch_size = patch_size
        self.cls_size = cls_size
        self.embed_dim = 3 * patch_size * patch_size
        self.num_register_tokens = 0

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, cls_size={self.cls_size}"

    def _cls_and_patches(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not a multiple of patch size {p}")
        patches = F.unfold(x.float(), kernel_size=p, stride=p).transpose(1, 2)  # [B, N, 3*p*p], row-major
        small = (
            x.float()
            if self.cls_size is None
            else F.interpolate(x.float(), size=(self.cls_size,) * 2, mode="area")
        )
        return small.flatten(1), patches

    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Tensor | None]:
        cls, patches = self._cls_and_patches(x)
        return {
            "x_norm_clstoken": cls,
            "x_norm_regtokens": patches.new_zeros(patches.shape[0], 0, patches.shape[2]),
            "x_norm_patchtokens": patches,
            "x_prenorm": None,
            "masks": masks,
        }

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        cls, patches = self._cls_and_patches(x)
        count = n if isinstance(n, int) else len(n)
        if reshape:
            b, _, h, w = x.shape
            patches = patches.transpose(1, 2).reshape(b, -1, h // self.patch_size, w // self.patch_size)
        if return_class_token:
            return tuple((patches, cls) for _ in range(count))
        return tuple(patches for _ in range(count))

    def forward(self, x: Tensor) -> Tensor:
        return self._cls_and_patches(x)[0]
