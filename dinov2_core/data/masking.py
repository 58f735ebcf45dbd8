"""Block-wise mask generator for iBOT (BEiT-style): masks are unions of random rectangles of random aspect ratio,
so the student must predict spatially coherent regions rather than isolated patches."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

RngLike = random.Random | torch.Generator | None


class _Rng:
    """uniform / randint over python's ``random`` module, a ``random.Random`` or a ``torch.Generator``."""

    def __init__(self, rng: RngLike) -> None:
        self.rng = rng

    def uniform(self, a: float, b: float) -> float:
        if isinstance(self.rng, torch.Generator):
            return a + (b - a) * float(torch.rand((), generator=self.rng, dtype=torch.float64))
        return (self.rng or random).uniform(a, b)

    def randint(self, a: int, b: int) -> int:
        """Inclusive on both ends, like ``random.randint``."""
        if isinstance(self.rng, torch.Generator):
            return int(torch.randint(a, b + 1, (), generator=self.rng))
        return (self.rng or random).randint(a, b)


class MaskingGenerator:
    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        """input_size: patch grid (H, W). Each rectangle covers between ``min_num_patches`` and ``max_num_patches``
        patches with log-uniform aspect ratio in [min_aspect, 1/min_aspect]."""
        if not isinstance(input_size, tuple):
            input_size = (input_size, input_size)
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            max_num_patches = num_masking_patches if num_masking_patches is not None else self.num_patches
        self.max_num_patches = max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}x{self.width}, patches per block {self.min_num_patches}-"
            f"{self.max_num_patches}, log aspect {self.log_aspect_ratio[0]:.3f}..{self.log_aspect_ratio[1]:.3f})"
        )

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _mask(self, mask: np.ndarray, max_mask_patches: float, rng: _Rng) -> int:
        """Try (up to 10 times) to add one rectangle that adds at most ``max_mask_patches`` new patches."""
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_mask_patches:
                    window[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int = 0, generator: RngLike = None) -> np.ndarray:
        """Boolean (H, W) mask with about ``num_masking_patches`` True entries (never more)."""
        rng = _Rng(generator)
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            delta = self._mask(mask, budget, rng)
            if delta == 0:
                break
            count += delta
        return mask


__all__ = ["MaskingGenerator"]
