"""Multi-crop augmentation of a whole batch with tensor ops (DINO/DINOv2 recipe, paper Sec. 3 and App. B).

The per-image :class:`~dinov2_core.data.augmentations.DataAugmentationDINO` makes ~25 small torchvision calls per
image; on a 2-core CPU that cost as much time as the model's training step (5.8 ms per image, 0.37 s per batch of
64 at 56/28 px). Here every random parameter is drawn per image (from that image's own seed, so an image's crops
do not depend on which batch, worker or rank it lands in), and then each operation runs once for the whole batch:

* random resized crop + resize: one ``roi_align`` call (bilinear, averaging ``ceil(box / out)`` samples per output
  pixel when shrinking, so large images are not aliased); horizontal flip;
* colour jitter with probability 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), grayscale 0.2,
  Gaussian blur (kernel 9, sigma in [0.1, 2]) with the paper's per-crop probabilities, solarisation (0.2) on the
  second global crop, ImageNet normalisation.

Deviations from torchvision's per-image pipeline, chosen for speed and stated here: bilinear instead of bicubic
resampling; the four jitter operations in a fixed order (brightness, contrast, saturation, hue) instead of a random
permutation; hue rotated in YIQ space instead of HSV.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from .augmentations import MultiCropSpec

_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ (NTSC); a hue shift is a rotation of the (I, Q) plane.
_RGB2YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


@dataclass(frozen=True, slots=True)
class CropParams:
    """The random choices for one crop of one image."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the (capped) image
    flip: bool
    jitter: tuple[float, float, float, float] | None  # brightness, contrast, saturation, hue; None: not applied
    gray: bool
    blur_sigma: float | None
    solarize: bool


def _between(bounds: tuple[float, float], u: float) -> float:
    """``Generator.uniform(lo, hi)`` from a ``Generator.random()`` draw ``u``: numpy computes ``lo + (hi - lo) * u``,
    so drawing several ``random()`` at once gives bit-identical values in one call."""
    lo, hi = bounds
    return lo + (hi - lo) * u


def _resized_crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop of clamped aspect ratio)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u_area, u_aspect = rng.random(2)  # one call, the same stream as two uniform() draws
        target = area * _between(scale, u_area)
        aspect = math.exp(_between(log_ratio, u_aspect))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return float(left), float(top), float(left + w), float(top + h)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return float(left), float(top), float(left + w), float(top + h)


class BatchMultiCrop(MultiCropSpec):
    """Two global and ``local_crops_number`` local crops of each image of a batch.

    ``__call__(images, seeds)``: ``images`` are uint8 tensors (3, H_i, W_i) of any sizes, ``seeds`` one integer per
    image. Returns ``{"global": (2, B, 3, G, G), "local": (N, B, 3, L, L) or None}`` float tensors, normalised.
    Arguments and defaults: :class:`~dinov2_core.data.augmentations.MultiCropSpec`.
    """

    batched = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def max_side(self) -> int:
        """Decoded images larger than this (shorter side) can be downscaled first without losing crop detail: the
        smallest local crop (scale min) must still span ``local_crops_size`` pixels."""
        lo = self.local_crops_scale[0]
        return max(2 * self.global_crops_size, math.ceil(self.local_crops_size / math.sqrt(lo)))

    # ------------------------------------------------------------------------------------------ parameters
    def sample(self, seed: int, height: int, width: int) -> list[CropParams]:
        """The crops of one image: global 1, global 2, then the local crops."""
        rng = np.random.default_rng(seed)
        p_g1, p_g2, p_loc = self.blur_probs
        kinds = [(self.global_crops_scale, p_g1, False), (self.global_crops_scale, p_g2, True)]
        kinds += [(self.local_crops_scale, p_loc, False)] * self.local_crops_number
        out = []
        for scale, p_blur, may_solarize in kinds:
            box = _resized_crop_box(rng, height, width, scale)
            # flip, jitter on, 4 jitter factors, gray, blur on, sigma (+ solarize): one call instead of 9-10 (the loader
            # runs this for every crop in the training process); the values are those of one draw per choice
            u = rng.random(10 if may_solarize else 9).tolist()
            factors = (_between((0.6, 1.4), u[2]), _between((0.6, 1.4), u[3]), _between((0.8, 1.2), u[4]),
                       _between((-0.1, 0.1), u[5]))
            out.append(CropParams(box, flip=u[0] < 0.5, jitter=factors if u[1] < 0.8 else None, gray=u[6] < 0.2,
                                  blur_sigma=_between((0.1, 2.0), u[8]) if u[7] < p_blur else None,
                                  solarize=may_solarize and u[9] < self.solarize_prob))
        return out

    # ------------------------------------------------------------------------------------------ ops
    @staticmethod
    def _pad_stack(images: Sequence[Tensor]) -> Tensor:
        """(B, 3, Hmax, Wmax) float in [0, 1]; edges replicated so bilinear sampling at a border never sees zeros."""
        hmax = max(int(im.shape[-2]) for im in images)
        wmax = max(int(im.shape[-1]) for im in images)
        out = []
        for im in images:
            x = im.float().div_(255.0)
            if x.shape[-2] != hmax or x.shape[-1] != wmax:
                x = F.pad(x[None], (0, wmax - x.shape[-1], 0, hmax - x.shape[-2]), mode="replicate")[0]
            out.append(x)
        return torch.stack(out)

    def _render(self, canvas: Tensor, params: list[tuple[int, CropParams]], size: int) -> Tensor:
        """Crops ``(image index, params)`` of ``canvas`` -> (K, 3, size, size), normalised."""
        boxes = torch.tensor([[i, *p.box] for i, p in params], dtype=torch.float32)
        x = roi_align(canvas, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        flips = torch.tensor([p.flip for _, p in params])
        if flips.any():
            x[flips] = x[flips].flip(-1)
        x = self._jitter(x, [p.jitter for _, p in params])
        gray = torch.tensor([p.gray for _, p in params])
        if gray.any():
            x[gray] = _luma(x[gray]).expand(-1, 3, -1, -1)
        blur = [k for k, (_, p) in enumerate(params) if p.blur_sigma is not None]
        if blur:
            idx = torch.tensor(blur)
            x[idx] = _gaussian_blur(x[idx], torch.tensor([params[k][1].blur_sigma for k in blur]))
        sol = torch.tensor([p.solarize for _, p in params])
        if sol.any():
            y = x[sol]
            x[sol] = torch.where(y >= 128 / 255, 1.0 - y, y)
        return (x - self._mean) / self._std

    @staticmethod
    def _jitter(x: Tensor, factors: list[tuple[float, float, float, float] | None]) -> Tensor:
        on = [k for k, f in enumerate(factors) if f is not None]
        if not on:
            return x
        idx = torch.tensor(on)
        f = torch.tensor([factors[k] for k in on], dtype=torch.float32)
        y = x[idx]
        view = (-1, 1, 1, 1)
        y = (y * f[:, 0].view(view)).clamp_(0, 1)  # brightness
        mean = _luma(y).mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - mean) * f[:, 1].view(view) + mean).clamp_(0, 1)  # contrast
        gray = _luma(y)
        y = ((y - gray) * f[:, 2].view(view) + gray).clamp_(0, 1)  # saturation
        theta = f[:, 3].double() * 2 * math.pi  # hue: rotate (I, Q)
        cos, sin = torch.cos(theta), torch.sin(theta)
        rot = torch.zeros(len(on), 3, 3, dtype=torch.float64)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        m = (torch.from_numpy(_YIQ2RGB) @ rot @ torch.from_numpy(_RGB2YIQ)).float()
        y = torch.einsum("kij,kjhw->kihw", m, y).clamp_(0, 1)
        x[idx] = y
        return x

    def __call__(self, images: Sequence[Tensor], seeds: Sequence[int]) -> dict[str, Tensor | None]:
        if len(images) != len(seeds):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        per_image = [self.sample(s, int(im.shape[-2]), int(im.shape[-1])) for im, s in zip(images, seeds)]
        canvas = self._pad_stack(images)
        g = [self._render(canvas, [(i, crops[c]) for i, crops in enumerate(per_image)], self.global_crops_size)
             for c in range(2)]
        n = self.local_crops_number
        loc = None
        if n:
            flat = [(i, crops[2 + c]) for c in range(n) for i, crops in enumerate(per_image)]  # crop-major
            loc = self._render(canvas, flat, self.local_crops_size).unflatten(0, (n, len(images)))
        return {"global": torch.stack(g), "local": loc}


def _luma(x: Tensor) -> Tensor:
    return (x[:, 0] * _LUMA[0] + x[:, 1] * _LUMA[1] + x[:, 2] * _LUMA[2]).unsqueeze(1)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int = 9) -> Tensor:
    """Separable Gaussian blur with one sigma per image (reflect padding, as torchvision's GaussianBlur)."""
    k, c, h, w = x.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    kern = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].float() ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (k*c, kernel)
    y = x.reshape(1, k * c, h, w)
    pad_h, pad_w = min(half, h - 1), min(half, w - 1)
    y = F.pad(y, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    kh = kern[:, half - pad_h: half + pad_h + 1]
    kw = kern[:, half - pad_w: half + pad_w + 1]
    y = F.conv2d(y, (kh / kh.sum(1, keepdim=True)).view(k * c, 1, -1, 1), groups=k * c)
    y = F.conv2d(y, (kw / kw.sum(1, keepdim=True)).view(k * c, 1, 1, -1), groups=k * c)
    return y.reshape(k, c, h, w)


__all__ = ["BatchMultiCrop", "CropParams"]
