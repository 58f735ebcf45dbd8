import math

import pytest
import torch

from dinov2_core.eval.metrics import (
    confusion_matrix,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
    segmentation_scores,
    topk_accuracy,
)

GT = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])


def test_topk_accuracy_hand_case():
    scores = torch.tensor([[0.9, 0.05, 0.05], [0.1, 0.2, 0.7], [0.5, 0.4, 0.1]])
    targets = torch.tensor([0, 1, 1])
    acc = topk_accuracy(scores, targets, (1, 2))
    assert acc[1] == pytest.approx(1 / 3)
    assert acc[2] == pytest.approx(1.0)


def test_confusion_matrix_rows_are_ground_truth():
    cm = confusion_matrix(PRED, GT, num_classes=4, ignore_index=255)
    expected = torch.tensor([[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(cm, expected)


def test_miou_hand_computed_with_absent_class_and_ignore():
    # valid (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,1); the 255 pixel is dropped.
    # IoU0 = 1/(1+1+1), IoU1 = 3/(3+1+0), IoU2 = 1/(1+0+1); class 3 absent -> excluded.
    cm = confusion_matrix(PRED, GT, num_classes=4, ignore_index=255)
    assert mean_iou(cm) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert pixel_accuracy(cm) == pytest.approx(5 / 7)
    iou = per_class_iou(cm)
    assert math.isnan(iou[3].item())
    scores = segmentation_scores(cm)
    assert scores["per_class_iou"][3] is None
    assert scores["per_class_iou"][:3] == pytest.approx([1 / 3, 3 / 4, 1 / 2])


def test_ignore_index_inside_class_range_is_excluded():
    # Ignoring class 2 removes its pixels entirely: IoU0 = 1/2, IoU1 = 3/4, classes 2 and 3 absent.
    cm = confusion_matrix(PRED, GT, num_classes=4, ignore_index=2)
    assert mean_iou(cm) == pytest.approx((1 / 2 + 3 / 4) / 2)
    assert cm[2].sum() == 0
