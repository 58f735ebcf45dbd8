"""Classification and segmentation metrics shared by every evaluation protocol.

All accuracies / IoUs are fractions in [0, 1] (multiply by 100 for the paper's tables).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def topk_accuracy(scores: Tensor, targets: Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Micro-averaged top-k accuracy ("mean accuracy" in the official metrics) for each k.

    scores: [N, C] (logits, probabilities or vote mass — only the ranking matters); targets: [N] int.
    A k larger than C is clamped to C (always correct), so callers decide whether to report it.
    """
    if scores.ndim != 2 or targets.ndim != 1 or scores.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected scores [N, C] and targets [N], got {tuple(scores.shape)} / {tuple(targets.shape)}"
        )
    n = targets.shape[0]
    ks = sorted({int(k) for k in ks})
    if n == 0:
        return {k: float("nan") for k in ks}
    max_k = min(max(ks), scores.shape[1])
    top = scores.topk(max_k, dim=1).indices  # [N, max_k], best first
    hits = top == targets.to(top.device).view(-1, 1)
    return {k: hits[:, : min(k, max_k)].any(dim=1).float().mean().item() for k in ks}


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = None
) -> Tensor:
    """[C, C] int64 counts, rows = ground truth, columns = prediction.

    Pixels/samples whose target equals ignore_index (or lies outside [0, C)) are dropped, so
    the ignore label never enters IoU or accuracy. Predictions must lie in [0, C).
    """
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long().to(pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target sizes differ: {pred.numel()} vs {target.numel()}")
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    pred, target = pred[keep], target[keep]
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError("predictions outside [0, num_classes)")
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def per_class_iou(confusion: Tensor) -> Tensor:
    """IoU per class = TP / (TP + FP + FN); NaN for classes absent from both GT and prediction."""
    cm = confusion.double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.full_like(tp, float("nan"))
    present = union > 0
    iou[present] = tp[present] / union[present]
    return iou


def mean_iou(confusion: Tensor) -> float:
    """Mean IoU over classes present in the GT or the prediction (absent classes are excluded)."""
    iou = per_class_iou(confusion)
    valid = ~torch.isnan(iou)
    return iou[valid].mean().item() if valid.any() else float("nan")


def pixel_accuracy(confusion: Tensor) -> float:
    """Fraction of (non-ignored) pixels labelled correctly."""
    total = confusion.sum().item()
    return confusion.diagonal().sum().item() / total if total else float("nan")


def segmentation_scores(confusion: Tensor) -> dict:
    """mIoU, pixel accuracy and per-class IoU (None where the class is absent) from one confusion matrix."""
    iou = per_class_iou(confusion)
    return {
        "miou": mean_iou(confusion),
        "pixel_acc": pixel_accuracy(confusion),
        "per_class_iou": [None if torch.isnan(v) else v.item() for v in iou],
    }
