"""Evaluation transforms and one-pass frozen-feature extraction shared by every protocol.

A single forward per image yields everything k-NN, the linear-probe grid and linear segmentation
need, so a backbone is run once per split and the result can be cached on disk.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from tqdm.auto import tqdm

# ImageNet statistics, as in the official eval transforms.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def snap_to_patch(size: int, patch_size: int) -> int:
    """Largest multiple of patch_size <= size (at least one patch), so no pixel is silently dropped by the ViT."""
    return max(patch_size, (int(size) // patch_size) * patch_size)


@dataclass(frozen=True)
class EvalTransformConfig:
    """Resize the shorter side, centre-crop to a multiple of the patch size, normalise.

    Defaults follow the official classification eval transform (resize 256, crop 224, bicubic,
    ImageNet mean/std); 224 = 16 x 14 is already patch-aligned.
    """

    resize_size: int = 256
    crop_size: int = 224
    patch_size: int = 14
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"

    @property
    def crop(self) -> int:
        return snap_to_patch(self.crop_size, self.patch_size)

    @property
    def grid_size(self) -> int:
        """Patches per side of the crop."""
        return self.crop // self.patch_size

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["crop"] = self.crop
        return d

    def _ops(self) -> list:
        return [
            v2.ToImage(),  # PIL / ndarray HWC / uint8 CHW tensor -> Image; masks wrapped as Mask pass through
            v2.Resize(self.resize_size, interpolation=InterpolationMode(self.interpolation), antialias=True),
            v2.CenterCrop(self.crop),
            v2.ToDtype(torch.float32, scale=True),  # images only; masks keep their integer dtype
            v2.Normalize(list(self.mean), list(self.std)),
        ]

    def build(self) -> v2.Compose:
        """Image-only transform: image -> float tensor [3, crop, crop]."""
        return v2.Compose(self._ops())

    def build_segmentation(self) -> SegEvalTransform:
        """Joint transform: (image, mask) -> (float [3, crop, crop], int64 [crop, crop]); mask uses nearest."""
        return SegEvalTransform(v2.Compose(self._ops()))


class SegEvalTransform:
    """Applies the same resize/crop to an image and its mask (nearest-neighbour for the mask)."""

    def __init__(self, ops: v2.Compose):
        self.ops = ops

    def __call__(self, image: Any, mask: Any) -> tuple[Tensor, Tensor]:
        mask_t = torch.as_tensor(np.array(mask))
        if mask_t.ndim == 2:
            mask_t = mask_t[None]
        img, m = self.ops(image, tv_tensors.Mask(mask_t))
        return img.as_subclass(Tensor), m.as_subclass(Tensor)[0].long()


def make_eval_transform(
    resize_size: int = 256, crop_size: int = 224, patch_size: int = 14, **kwargs: Any
) -> v2.Compose:
    """Shortcut for EvalTransformConfig(...).build()."""
    return EvalTransformConfig(resize_size, crop_size, patch_size, **kwargs).build()


@dataclass
class ExtractedFeatures:
    """Frozen features of one split, in the layout every protocol reads from.

    cls:        [N, B, D]  CLS token (final norm applied) of the last B blocks, oldest first,
                           so cls[:, -1] is the final-block CLS used by k-NN.
    patch_mean: [N, B, Dp] average-pooled patch tokens of the same blocks.
    patch_grid: [N, Dp, h, w] final-block patch tokens on the patch grid (segmentation / PCA), optional.
    targets:    [N] class labels, [N, H, W] masks, or None.
    """

    cls: Tensor
    patch_mean: Tensor
    patch_grid: Tensor | None = None
    targets: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.cls.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.cls.shape[1]

    def knn_features(self) -> Tensor:
        """Final-block CLS token, the official k-NN feature (normalised later by knn code)."""
        return self.cls[:, -1]

    def linear_input(self, n_last_blocks: int, avgpool: bool) -> Tensor:
        """Official linear-probe input: concat CLS of the last n blocks (+ mean patch token of the final block)."""
        if not 1 <= n_last_blocks <= self.n_blocks:
            raise ValueError(f"n_last_blocks={n_last_blocks} but only {self.n_blocks} blocks were extracted")
        x = self.cls[:, -n_last_blocks:].reshape(len(self), -1)
        if avgpool:
            x = torch.cat([x, self.patch_mean[:, -1]], dim=1)
        return x.float()

    def subset(self, index: Tensor | list[int]) -> ExtractedFeatures:
        index = torch.as_tensor(index, dtype=torch.long)
        return ExtractedFeatures(
            cls=self.cls[index],
            patch_mean=self.patch_mean[index],
            patch_grid=None if self.patch_grid is None else self.patch_grid[index],
            targets=None if self.targets is None else self.targets[index],
            meta=dict(self.meta),
        )

    def save(self, path: str | Path) -> None:
        torch.save(
            {
                "cls": self.cls,
                "patch_mean": self.patch_mean,
                "patch_grid": self.patch_grid,
                "targets": self.targets,
                "meta": self.meta,
            },
            Path(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> ExtractedFeatures:
        d = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(**d)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _split_batch(batch: Any) -> tuple[Tensor, Any]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        return batch["image"], batch.get("target", batch.get("label", batch.get("mask")))
    raise TypeError(f"unsupported batch type {type(batch)}")


def patch_tokens_to_grid(patch_tokens: Tensor, height: int, width: int, patch_size: int) -> Tensor:
    """[B, N, D] row-major patch tokens -> [B, D, H/p, W/p]."""
    b, n, d = patch_tokens.shape
    h, w = height // patch_size, width // patch_size
    if h * w != n:
        raise ValueError(
            f"{n} patch tokens do not fit a {h}x{w} grid (input {height}x{width}, patch {patch_size})"
        )
    return patch_tokens.transpose(1, 2).reshape(b, d, h, w)


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    loader: Iterable,
    *,
    n_last_blocks: int = 4,
    keep_patch_grid: bool = False,
    device: torch.device | str | None = None,
    grid_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    desc: str = "features",
) -> ExtractedFeatures:
    """Run a frozen backbone once over `loader` and collect the features of all protocols.

    loader yields `images` or `(images, targets)` (targets: int labels [B] or masks [B, H, W]) or
    dicts with "image" and "target"/"label"/"mask". Images must already be transformed to
    [B, 3, H, W] with H, W multiples of model.patch_size. The last n_last_blocks blocks are taken
    (official linear probe uses 1 or 4). Results are float32 on CPU (patch_grid in grid_dtype;
    float16 halves the memory of large segmentation sets).
    """
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else _model_device(model)
    patch_size = int(model.patch_size)
    cls_list, mean_list, grid_list, tgt_list = [], [], [], []
    try:
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            images, targets = _split_batch(batch)
            images = images.to(device, non_blocking=True)
            if images.shape[-1] % patch_size or images.shape[-2] % patch_size:
                raise ValueError(
                    f"input {tuple(images.shape[-2:])} is not a multiple of patch size {patch_size}"
                )
            outs = model.get_intermediate_layers(
                images, n_last_blocks, reshape=False, return_class_token=True, norm=True
            )
            cls_list.append(torch.stack([c for _, c in outs], dim=1).float().cpu())
            mean_list.append(torch.stack([p.mean(dim=1) for p, _ in outs], dim=1).float().cpu())
            if keep_patch_grid:
                grid = patch_tokens_to_grid(outs[-1][0], images.shape[-2], images.shape[-1], patch_size)
                grid_list.append(grid.to("cpu", grid_dtype))
            if targets is not None:
                tgt_list.append(torch.as_tensor(targets).cpu())
    finally:
        model.train(was_training)
    if not cls_list:
        raise ValueError("loader produced no batches")
    targets_all = None
    if tgt_list:
        if len(tgt_list) != len(cls_list):
            raise ValueError("some batches had targets and some did not")
        targets_all = torch.cat(tgt_list).long()
    return ExtractedFeatures(
        cls=torch.cat(cls_list),
        patch_mean=torch.cat(mean_list),
        patch_grid=torch.cat(grid_list) if keep_patch_grid else None,
        targets=targets_all,
        meta={"n_last_blocks": n_last_blocks, "patch_size": patch_size},
    )


@torch.inference_mode()
def extract_patch_grid(model: nn.Module, images: Tensor) -> Tensor:
    """Final-block, final-norm patch tokens of a batch as a grid [B, D, h, w] (for PCA maps)."""
    was_training = model.training
    model.eval()
    try:
        images = images.to(_model_device(model))
        tokens = model.forward_features(images)["x_norm_patchtokens"]
    finally:
        model.train(was_training)
    return (
        patch_tokens_to_grid(tokens, images.shape[-2], images.shape[-1], int(model.patch_size)).float().cpu()
    )


def _hash_state_dict(h: hashlib._Hash, model: nn.Module) -> None:
    h.update(repr(model).encode())  # architecture (and config of parameter-free adapters)
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def feature_cache_key(
    backbone: nn.Module | str,
    dataset_id: str,
    transform_params: Mapping[str, Any] | EvalTransformConfig,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Stable sha256 hex key for cached features.

    backbone: a module (its repr and state_dict bytes are hashed) or a caller-provided id
    (e.g. a checkpoint's content hash — much cheaper for big models). extra: anything else that
    changes the features (n_last_blocks, keep_patch_grid, ...).
    """
    h = hashlib.sha256()
    if isinstance(backbone, nn.Module):
        h.update(b"module:")
        _hash_state_dict(h, backbone)
    else:
        h.update(f"id:{backbone}".encode())
    if isinstance(transform_params, EvalTransformConfig):
        transform_params = transform_params.as_dict()
    payload = {"dataset": dataset_id, "transform": dict(transform_params), "extra": dict(extra or {})}
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    return h.hexdigest()
