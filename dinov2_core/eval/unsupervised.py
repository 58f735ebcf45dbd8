"""What frozen features say without labels: how spread out they are, and which images they call alike.

For a user's own images there may be no labelled set. Then the honest report is about the features themselves:
the *effective rank* of their covariance (Roy & Vetterli 2007: exp of the entropy of the normalised eigenvalues;
~1 when every image maps to one direction, up to the dimension when the spread is even), the mean cosine between
two different images (near 1 is collapse, the failure mode self-distillation guards against with centering and
sharpening, DINO §3.1 / DINOv2 §4), the per-dimension spread, and nearest-neighbour retrieval examples a person
can judge by eye.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dinov2_core.atomic import atomic_path

__all__ = ["feature_statistics", "nearest_neighbours", "save_retrieval_grid"]


def feature_statistics(features: Tensor) -> dict[str, float]:
    """effective_rank, mean_pair_cosine (over distinct pairs) and feature_std (mean per-dimension std) of
    L2-normalised [N, D] features."""
    x = torch.nn.functional.normalize(features.float(), dim=1)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"feature statistics need at least 2 images, got {n}")
    centred = x - x.mean(0, keepdim=True)
    eig = torch.linalg.svdvals(centred).square()
    p = eig / eig.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    cos = x @ x.T
    pair = (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
    return {"effective_rank": float(entropy.exp()), "mean_pair_cosine": float(pair),
            "feature_std": float(x.std(0).mean())}


def nearest_neighbours(features: Tensor, n_queries: int, k: int) -> Tensor:
    """[q, k] indices of the k most similar other images (cosine) for the first ``n_queries`` images."""
    x = torch.nn.functional.normalize(features.float(), dim=1)
    q = min(n_queries, x.shape[0])
    sims = x[:q] @ x.T
    sims[torch.arange(q), torch.arange(q)] = -float("inf")  # never its own neighbour
    return sims.topk(min(k, x.shape[0] - 1), dim=1).indices


def save_retrieval_grid(path: str | Path, images: list[Tensor], neighbours: Tensor, title: str) -> Path:
    """One row per query: the query image, then its neighbours, left to right by similarity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = neighbours.shape[0], neighbours.shape[1] + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for r in range(rows):
        for c, index in enumerate([r, *neighbours[r].tolist()]):
            img = images[index].float()
            img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-6)
            axes[r][c].imshow(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))
            axes[r][c].set_axis_off()
        axes[r][0].set_title("query" if r == 0 else "", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path
