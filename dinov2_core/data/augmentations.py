"""Multi-crop augmentation (DINO, Caron et al. 2021; DINOv2 paper Sec. 3 and App. B): two global crops and N local
crops of one image, each with flip, colour jitter, grayscale and blur; solarisation on the second global crop.

Blur probabilities: the paper follows BYOL (1.0 on global crop 1, 0.1 on global crop 2, 0.5 on local crops), which
is the default here. The reference code's GaussianBlur wrapper inverts its probability, so the released checkpoints
were trained with (0.0, 0.9, 0.5); pass ``blur_probs=RELEASED_CHECKPOINTS_BLUR_PROBS`` to reproduce that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from dinov2_core.config import PAPER_BLUR_PROBS

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

RELEASED_CHECKPOINTS_BLUR_PROBS = (0.0, 0.9, 0.5)  # what the reference code effectively applies


def make_normalize_transform(
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
) -> v2.Normalize:
    return v2.Normalize(mean=list(mean), std=list(std))


def gaussian_blur(p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> v2.Transform:
    """Blur with probability ``p`` (not inverted), kernel 9, sigma ~ U(radius_min, radius_max)."""
    return v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(radius_min, radius_max))], p=p)


class MultiCropSpec:
    """The multi-crop recipe's settings, shared by the per-image transform below and the batched one
    (:class:`~dinov2_core.data.batch_augment.BatchMultiCrop`), so both take the same arguments and defaults.

    Defaults: global scale (0.32, 1.0) at 224 px, 8 local crops of scale (0.05, 0.32) at 98 px (the size DINOv2
    uses with patch 14); blur probabilities as in the paper (module docstring), solarisation 0.2 on the second global
    crop, ImageNet normalisation.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 98,
        blur_probs: tuple[float, float, float] = PAPER_BLUR_PROBS,
        solarize_prob: float = 0.2,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.blur_probs = tuple(blur_probs)
        self.solarize_prob = solarize_prob
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global={self.global_crops_size}px {self.global_crops_scale}, "
            f"local={self.local_crops_number}x{self.local_crops_size}px {self.local_crops_scale}, "
            f"blur={self.blur_probs}, solarize={self.solarize_prob})"
        )


class DataAugmentationDINO(MultiCropSpec):
    """image (PIL, uint8 or float [0, 1] tensor) -> dict with ``global_crops`` (2 x (3, G, G) float tensors),
    ``global_crops_teacher`` (the same two), ``local_crops`` (N x (3, L, L)), ``offsets`` (empty; official key).
    Arguments and defaults: :class:`MultiCropSpec`. Calling with ``generator=`` (a ``torch.Generator``) or ``seed=``
    makes the crops a deterministic function of it without touching the global RNG.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        bicubic = v2.InterpolationMode.BICUBIC
        self.to_uint8 = v2.Compose([v2.ToImage(), v2.ToDtype(torch.uint8, scale=True)])
        self.geometric_augmentation_global = v2.Compose(
            [
                v2.RandomResizedCrop(
                    self.global_crops_size, scale=self.global_crops_scale, interpolation=bicubic, antialias=True
                ),
                v2.RandomHorizontalFlip(p=0.5),
            ]
        )
        self.geometric_augmentation_local = v2.Compose(
            [
                v2.RandomResizedCrop(
                    self.local_crops_size, scale=self.local_crops_scale, interpolation=bicubic, antialias=True
                ),
                v2.RandomHorizontalFlip(p=0.5),
            ]
        )
        color_jittering = v2.Compose(
            [
                v2.RandomApply(
                    [v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
                ),
                v2.RandomGrayscale(p=0.2),
            ]
        )
        self.normalize = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), make_normalize_transform(self.mean, self.std)]
        )
        p_g1, p_g2, p_loc = self.blur_probs
        self.global_transfo1 = v2.Compose([color_jittering, gaussian_blur(p_g1), self.normalize])
        self.global_transfo2 = v2.Compose(
            [
                color_jittering,
                gaussian_blur(p_g2),
                v2.RandomSolarize(threshold=128, p=self.solarize_prob),
                self.normalize,
            ]
        )
        self.local_transfo = v2.Compose([color_jittering, gaussian_blur(p_loc), self.normalize])

    def _apply(self, image: Any) -> dict[str, Any]:
        image = self.to_uint8(image)  # solarisation threshold 128 assumes uint8
        g1 = self.global_transfo1(self.geometric_augmentation_global(image))
        g2 = self.global_transfo2(self.geometric_augmentation_global(image))
        locals_ = [
            self.local_transfo(self.geometric_augmentation_local(image))
            for _ in range(self.local_crops_number)
        ]
        strip = lambda t: t.as_subclass(torch.Tensor)
        g1, g2 = strip(g1), strip(g2)
        return {
            "global_crops": [g1, g2],
            "global_crops_teacher": [g1, g2],
            "local_crops": [strip(t) for t in locals_],
            "offsets": (),
        }

    def __call__(self, image: Any, generator: torch.Generator | None = None, seed: int | None = None):
        if generator is None and seed is None:
            return self._apply(image)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._apply(image)


MultiCropAugmentation = DataAugmentationDINO

__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "PAPER_BLUR_PROBS",
    "RELEASED_CHECKPOINTS_BLUR_PROBS",
    "DataAugmentationDINO",
    "MultiCropAugmentation",
    "MultiCropSpec",
    "gaussian_blur",
    "make_normalize_transform",
]
