"""Small helpers to turn eval tensors into displayable images and write PNG grids.

Uses matplotlib's object API with the Agg canvas directly, so it never touches the global
pyplot backend of the calling process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from .features import IMAGENET_MEAN, IMAGENET_STD


def to_uint8_image(
    image: Tensor | np.ndarray,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> np.ndarray:
    """One image -> uint8 [H, W, 3].

    Accepts uint8 HWC/CHW (returned as is) or float CHW/HWC; float images are un-normalised with
    mean/std (pass None for images already in [0, 1]).
    """
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32)
    if mean is not None and std is not None:
        arr = arr * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def class_palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """Fixed, well-spread colours per class (uint8 [C, 3]); deterministic across runs."""
    base = [
        (230, 25, 75),
        (60, 180, 75),
        (255, 225, 25),
        (0, 130, 200),
        (245, 130, 48),
        (145, 30, 180),
        (70, 240, 240),
        (240, 50, 230),
        (210, 245, 60),
        (250, 190, 212),
        (0, 128, 128),
        (220, 190, 255),
        (170, 110, 40),
        (255, 250, 200),
        (128, 0, 0),
        (170, 255, 195),
        (128, 128, 0),
        (255, 215, 180),
        (0, 0, 128),
        (128, 128, 128),
    ]
    if num_classes <= len(base):
        return np.asarray(base[:num_classes], dtype=np.uint8)
    extra = np.random.default_rng(seed).integers(0, 256, size=(num_classes - len(base), 3), dtype=np.uint8)
    return np.concatenate([np.asarray(base, dtype=np.uint8), extra])


def colorize_mask(mask: Tensor | np.ndarray, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """[H, W] class ids -> uint8 [H, W, 3]; ignored / out-of-range pixels are black."""
    m = mask.detach().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    m = m.astype(np.int64)
    out = np.zeros(m.shape + (3,), dtype=np.uint8)
    valid = (m >= 0) & (m < num_classes)
    if ignore_index is not None:
        valid &= m != ignore_index
    out[valid] = class_palette(num_classes)[m[valid]]
    return out


def save_image_grid(
    path: str | Path, rows: list[list[np.ndarray]], column_titles: Sequence[str], cell_inches: float = 2.2
) -> Path:
    """Write a rows x columns grid of uint8 images to a PNG and return its path."""
    if not rows:
        raise ValueError("nothing to draw")
    n_rows, n_cols = len(rows), len(rows[0])
    fig = Figure(figsize=(cell_inches * n_cols, cell_inches * n_rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and c < len(column_titles):
                ax.set_title(column_titles[c], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def upsample_nearest(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a uint8 [h, w, 3] map to [height, width, 3] (patch map -> image size)."""
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(height, width), mode="nearest")
    return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
