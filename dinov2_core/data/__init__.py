"""Data pieces of the DINOv2 recipe: multi-crop augmentation, iBOT block masking, step collation."""

from .augmentations import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PAPER_BLUR_PROBS,
    RELEASED_CHECKPOINTS_BLUR_PROBS,
    DataAugmentationDINO,
    MultiCropAugmentation,
    make_normalize_transform,
)
from .collate import MultiCropCollator, collate_data_and_cast
from .masking import MaskingGenerator

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "PAPER_BLUR_PROBS",
    "RELEASED_CHECKPOINTS_BLUR_PROBS",
    "DataAugmentationDINO",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "MultiCropCollator",
    "collate_data_and_cast",
    "make_normalize_transform",
]
