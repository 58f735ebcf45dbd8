"""Linear semantic segmentation on frozen patch tokens (paper "lin." setting).

BatchNorm + 1x1 conv (a per-patch linear layer) predicts a low-resolution logit map that is
bilinearly upsampled to the mask size; only the head is trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._display import colorize_mask, save_image_grid, to_uint8_image
from .features import IMAGENET_MEAN, IMAGENET_STD, ExtractedFeatures
from .metrics import confusion_matrix, segmentation_scores

IGNORE_INDEX = 255  # ADE20k / VOC convention used by the official mmseg configs
# Official linear-head configs train with AdamW (lr 1e-3) and a linear ("poly", power 1) decay;
# iteration count is scaled down here to epochs over a small frozen-feature set.
SEG_LR = 1e-3
SEG_WEIGHT_DECAY = 1e-4
SEG_EPOCHS = 20


class LinearSegHead(nn.Module):
    """BatchNorm over channels + 1x1 conv, like the official BNHead with a linear classifier."""

    def __init__(self, in_dim: int, num_classes: int, generator: torch.Generator | None = None):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(
            self.conv.weight, mean=0.0, std=0.01, generator=generator
        )  # official conv_seg init (Normal, std 0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, grid: Tensor, out_size: tuple[int, int] | None = None) -> Tensor:
        """grid [B, D, h, w] -> logits [B, C, h, w], or bilinearly upsampled to out_size."""
        logits = self.conv(self.bn(grid.float()))
        if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
            logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits


@dataclass
class SegmentationResult:
    miou: float
    pixel_acc: float
    per_class_iou: list[float | None]
    confusion: Tensor
    head: LinearSegHead | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"miou": self.miou, "pixel_acc": self.pixel_acc, "per_class_iou": list(self.per_class_iou)}


def train_linear_segmentation(
    train_grid: Tensor,
    train_masks: Tensor,
    num_classes: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    epochs: int = SEG_EPOCHS,
    batch_size: int = 16,
    lr: float = SEG_LR,
    weight_decay: float = SEG_WEIGHT_DECAY,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LinearSegHead:
    """Fit the head with cross-entropy (ignore_index skipped) on upsampled logits vs full-size masks.

    train_grid [N, D, h, w] (any float dtype), train_masks [N, H, W] int. Deterministic given seed.
    """
    if train_grid.shape[0] != train_masks.shape[0]:
        raise ValueError("grid and masks have different lengths")
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    head = LinearSegHead(train_grid.shape[1], num_classes, generator=g).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = train_grid.shape[0]
    total = max(1, epochs * -(-n // batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: max(0.0, 1.0 - it / total))
    out_size = tuple(train_masks.shape[-2:])
    head.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            x = train_grid[idx].to(device, torch.float32)
            y = train_masks[idx].to(device).long()
            loss = F.cross_entropy(head(x, out_size), y, ignore_index=ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head.eval()


@torch.no_grad()
def predict_segmentation(
    head: LinearSegHead, grid: Tensor, out_size: tuple[int, int], *, batch_size: int = 16
) -> Tensor:
    """Argmax class map [N, H, W] (int64) at out_size."""
    head.eval()
    device = next(head.parameters()).device
    preds = [
        head(grid[i : i + batch_size].to(device, torch.float32), out_size).argmax(1).cpu()
        for i in range(0, grid.shape[0], batch_size)
    ]
    return torch.cat(preds) if preds else torch.zeros(0, *out_size, dtype=torch.long)


@torch.no_grad()
def evaluate_segmentation(
    head: LinearSegHead,
    grid: Tensor,
    masks: Tensor,
    num_classes: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    batch_size: int = 16,
) -> SegmentationResult:
    """mIoU / pixel accuracy from one confusion matrix accumulated over the whole split."""
    head.eval()
    device = next(head.parameters()).device
    out_size = tuple(masks.shape[-2:])
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for i in range(0, grid.shape[0], batch_size):
        pred = head(grid[i : i + batch_size].to(device, torch.float32), out_size).argmax(1)
        cm += confusion_matrix(pred, masks[i : i + batch_size], num_classes, ignore_index)
    s = segmentation_scores(cm)
    return SegmentationResult(s["miou"], s["pixel_acc"], s["per_class_iou"], cm, head)


def linear_segmentation(
    train: ExtractedFeatures,
    test: ExtractedFeatures,
    num_classes: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    epochs: int = SEG_EPOCHS,
    batch_size: int = 16,
    lr: float = SEG_LR,
    weight_decay: float = SEG_WEIGHT_DECAY,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> SegmentationResult:
    """Train on `train` (patch_grid + mask targets), report mIoU / pixel acc on `test`."""
    for name, split in (("train", train), ("test", test)):
        if split.patch_grid is None or split.targets is None or split.targets.ndim != 3:
            raise ValueError(
                f"{name} split needs patch_grid (keep_patch_grid=True) and [N, H, W] mask targets"
            )
    head = train_linear_segmentation(
        train.patch_grid,
        train.targets,
        num_classes,
        ignore_index=ignore_index,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        device=device,
    )
    return evaluate_segmentation(
        head, test.patch_grid, test.targets, num_classes, ignore_index=ignore_index, batch_size=batch_size
    )


def save_segmentation_figure(
    path: str | Path,
    images: Tensor,
    gt_masks: Tensor,
    pred_masks: Tensor,
    num_classes: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    max_images: int = 4,
    mean: Sequence[float] | None = IMAGENET_MEAN,
    std: Sequence[float] | None = IMAGENET_STD,
) -> Path:
    """PNG with one row per image: image | ground truth | prediction (ignored pixels black).

    images: [N, 3, H, W] normalised floats (un-normalised with mean/std) or uint8.
    """
    n = min(max_images, len(images), len(gt_masks), len(pred_masks))
    rows = [
        [
            to_uint8_image(images[i], mean, std),
            colorize_mask(gt_masks[i], num_classes, ignore_index),
            colorize_mask(pred_masks[i], num_classes, ignore_index),
        ]
        for i in range(n)
    ]
    return save_image_grid(path, rows, ("image", "ground truth", "prediction"))
