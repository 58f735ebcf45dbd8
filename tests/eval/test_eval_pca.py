import numpy as np
import torch

from dinov2_core.eval.pca import pca_foreground_mask, pca_rgb, pca_rgb_from_model, save_pca_grid


def _object_grid(n=3, d=12, h=8, w=8, seed=0):
    """Central 4x4 'object' patches share one feature direction, the border another."""
    g = torch.Generator().manual_seed(seed)
    fg_dir, bg_dir = torch.randn(d, generator=g), torch.randn(d, generator=g)
    grid = 0.1 * torch.randn(n, d, h, w, generator=g) + bg_dir[None, :, None, None]
    fg = torch.zeros(h, w, dtype=torch.bool)
    fg[2:6, 2:6] = True
    grid[:, :, fg] += (fg_dir - bg_dir)[None, :, None] + 0.5 * torch.randn(n, d, int(fg.sum()), generator=g)
    return grid, fg


def test_pca_rgb_shape_dtype_and_range():
    grid, _ = _object_grid()
    rgb = pca_rgb(grid)
    assert rgb.shape == (3, 8, 8, 3) and rgb.dtype == np.uint8
    for c in range(3):  # each component min-max scaled over all images
        assert rgb[..., c].min() == 0 and rgb[..., c].max() == 255
    assert np.array_equal(rgb, pca_rgb(grid))  # deterministic


def test_foreground_threshold_finds_object_and_blacks_out_background():
    grid, fg = _object_grid()
    for sign in (1.0, -1.0):  # PCA sign is arbitrary: orientation must not depend on it
        mask = pca_foreground_mask(sign * grid, threshold=0.5)
        assert mask.shape == (3, 8, 8)
        assert (mask == fg.numpy()[None]).mean() > 0.95
    rgb = pca_rgb(grid, foreground_threshold=0.5)
    bg = ~pca_foreground_mask(grid, 0.5)
    assert (rgb[bg] == 0).all() and rgb[~bg].max() == 255


def test_pca_from_model_and_grid_png(tmp_path, tiny_vit):
    images = torch.randn(2, 3, 56, 70)
    maps = pca_rgb_from_model(tiny_vit, images, foreground_threshold=0.6)
    assert maps.shape == (2, 4, 5, 3) and maps.dtype == np.uint8
    out = save_pca_grid(tmp_path / "pca" / "grid.png", images, maps)
    assert out.exists() and out.read_bytes()[:4] == b"\x89PNG"
