"""Frozen-feature evaluation of DINOv2-style backbones: k-NN, linear probe, linear segmentation, PCA maps.

Pure torch/numpy: functions take modules/tensors and return tensors, dataclasses or dicts.
Any module with forward_features / get_intermediate_layers / patch_size works (trained,
random-init, or the RawPixelBackbone baseline).
"""

from .baselines import RawPixelBackbone
from .features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransformConfig,
    ExtractedFeatures,
    SegEvalTransform,
    extract_features,
    extract_patch_grid,
    feature_cache_key,
    make_eval_transform,
    snap_to_patch,
)
from .knn import KNN_KS, KNN_TEMPERATURE, KnnProbe, knn_classify, knn_vote_scores
from .linear import LINEAR_LRS, LinearProbeConfig, LinearProbeResult, linear_probe, stratified_split
from .metrics import (
    confusion_matrix,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
    segmentation_scores,
    topk_accuracy,
)
from .pca import pca_foreground_mask, pca_rgb, pca_rgb_from_model, save_pca_grid
from .segmentation import (
    IGNORE_INDEX,
    LinearSegHead,
    SegmentationResult,
    evaluate_segmentation,
    linear_segmentation,
    predict_segmentation,
    save_segmentation_figure,
    train_linear_segmentation,
)

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNN_KS",
    "KNN_TEMPERATURE",
    "LINEAR_LRS",
    "EvalTransformConfig",
    "ExtractedFeatures",
    "KnnProbe",
    "LinearProbeConfig",
    "LinearProbeResult",
    "LinearSegHead",
    "RawPixelBackbone",
    "SegEvalTransform",
    "SegmentationResult",
    "confusion_matrix",
    "evaluate_segmentation",
    "extract_features",
    "extract_patch_grid",
    "feature_cache_key",
    "knn_classify",
    "knn_vote_scores",
    "linear_probe",
    "linear_segmentation",
    "make_eval_transform",
    "mean_iou",
    "pca_foreground_mask",
    "pca_rgb",
    "pca_rgb_from_model",
    "per_class_iou",
    "pixel_accuracy",
    "predict_segmentation",
    "save_pca_grid",
    "save_segmentation_figure",
    "segmentation_scores",
    "snap_to_patch",
    "stratified_split",
    "topk_accuracy",
    "train_linear_segmentation",
]
