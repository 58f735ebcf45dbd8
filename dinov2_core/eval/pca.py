"""PCA of patch features rendered as RGB, in the style of the paper's Figure 1.

The PCA is fitted jointly on all images' patches so that matching parts get matching colours.
Optionally the first component is thresholded to separate foreground from background, and
the 3-component PCA is then refitted on foreground patches only (background drawn black).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ._display import save_image_grid, to_uint8_image, upsample_nearest
from .features import IMAGENET_MEAN, IMAGENET_STD, extract_patch_grid


def _pca_project(x: Tensor, n_components: int) -> Tensor:
    """Project rows of x [M, D] on its top principal components -> [M, n_components] (zero-padded).

    Signs are fixed (largest-magnitude loading positive) so colours are reproducible.
    """
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    cov = x.T @ x / max(1, x.shape[0] - 1)
    _, evecs = torch.linalg.eigh(cov)  # ascending
    comps = evecs.flip(1)[:, :n_components]
    pivot = comps.abs().argmax(0)
    signs = torch.sign(comps[pivot, torch.arange(comps.shape[1])])
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    proj = x @ comps
    if proj.shape[1] < n_components:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], n_components - proj.shape[1])], 1)
    return proj


def _minmax(v: Tensor) -> Tensor:
    lo, hi = v.min(0).values, v.max(0).values
    return (v - lo) / torch.where(hi - lo > 0, hi - lo, torch.ones_like(hi))


def _flatten_grid(patch_grid: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    if patch_grid.ndim != 4:
        raise ValueError(f"expected patch grid [N, D, h, w], got {tuple(patch_grid.shape)}")
    n, d, h, w = patch_grid.shape
    return patch_grid.float().permute(0, 2, 3, 1).reshape(n * h * w, d), (n, h, w)


def pca_foreground_mask(patch_grid: Tensor, threshold: float = 0.5) -> np.ndarray:
    """bool [N, h, w]: first principal component (min-max scaled) above threshold.

    The sign of a principal component is arbitrary, so it is oriented such that the image
    borders are mostly background (objects tend to be central).
    """
    x, (n, h, w) = _flatten_grid(patch_grid)
    score = _minmax(_pca_project(x, 1))[:, 0].reshape(n, h, w)
    fg = score > threshold
    if h >= 3 and w >= 3:
        border = torch.ones(h, w, dtype=torch.bool)
        border[1:-1, 1:-1] = False
        if fg[:, border].float().mean() > fg[:, ~border].float().mean():
            fg = (1.0 - score) > threshold
    return fg.numpy()


def pca_rgb(patch_grid: Tensor, *, foreground_threshold: float | None = None) -> np.ndarray:
    """First 3 principal components of the patch features as colours: uint8 [N, h, w, 3].

    patch_grid: [N, D, h, w] (e.g. ExtractedFeatures.patch_grid or extract_patch_grid()).
    With foreground_threshold, background patches (see pca_foreground_mask) are black and the
    PCA is refitted on foreground patches, as in the paper's Figure 1.
    """
    x, (n, h, w) = _flatten_grid(patch_grid)
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    if foreground_threshold is not None:
        keep = torch.from_numpy(pca_foreground_mask(patch_grid, foreground_threshold)).reshape(-1)
        if keep.sum() < 3:  # too few foreground patches for a meaningful PCA: show everything
            keep = torch.ones_like(keep)
    rgb = torch.zeros(x.shape[0], 3, dtype=torch.float64)
    rgb[keep] = _minmax(_pca_project(x[keep], 3))
    return (rgb * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).reshape(n, h, w, 3).numpy()


def pca_rgb_from_model(
    model: nn.Module, images: Tensor, *, foreground_threshold: float | None = None
) -> np.ndarray:
    """Convenience: final-block patch tokens of `images` [B, 3, H, W] -> pca_rgb maps [B, h, w, 3]."""
    return pca_rgb(extract_patch_grid(model, images), foreground_threshold=foreground_threshold)


def save_pca_grid(
    path: str | Path,
    images: Tensor | np.ndarray,
    pca_maps: np.ndarray,
    *,
    max_images: int = 8,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> Path:
    """PNG with one row per image: image | PCA map (nearest-upsampled to the image size)."""
    n = min(max_images, len(images), len(pca_maps))
    rows = []
    for i in range(n):
        img = to_uint8_image(images[i], mean, std)
        rows.append([img, upsample_nearest(np.asarray(pca_maps[i]), img.shape[0], img.shape[1])])
    return save_image_grid(path, rows, ("image", "PCA of patch features"))
