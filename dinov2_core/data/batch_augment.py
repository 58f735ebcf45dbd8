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
from dataclasses import dataclass, fields, replace
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


@dataclass(frozen=True)
class CropPlan:
    """A batch's images and every crop's random choices, as tensors; crops crop-major (global crop 1 of every image,
    then global crop 2, then each local crop). What a loader worker hands over when the crops are rendered on the
    training device (:meth:`BatchMultiCrop.render`): the uint8 images are ~40x smaller than the float crops of
    2 + 6 crops at 56/28 px, and rendering them there takes the heaviest part of the input pipeline off the CPU."""

    canvas: Tensor  # (B, 3, H, W) uint8, edges replicated up to the batch's largest image
    image: Tensor  # (K,) int64: the image each crop is cut from
    box: Tensor  # (K, 4) float32: x0, y0, x1, y1 in pixels of the canvas
    flip: Tensor  # (K,) bool
    jitter_on: Tensor  # (K,) bool
    jitter: Tensor  # (K, 4) float32: brightness, contrast, saturation, hue factors (used where jitter_on)
    gray: Tensor  # (K,) bool
    blur_on: Tensor  # (K,) bool
    blur_sigma: Tensor  # (K,) float32 (used where blur_on)
    solarize: Tensor  # (K,) bool

    @classmethod
    def from_params(cls, canvas: Tensor, crops: Sequence[tuple[int, CropParams]]) -> CropPlan:
        ps = [p for _, p in crops]
        flags = lambda f: torch.tensor([bool(f(p)) for p in ps], dtype=torch.bool)
        return cls(canvas=canvas, image=torch.tensor([i for i, _ in crops], dtype=torch.int64),
                   box=torch.tensor([p.box for p in ps], dtype=torch.float32).reshape(-1, 4),
                   flip=flags(lambda p: p.flip), jitter_on=flags(lambda p: p.jitter is not None),
                   jitter=torch.tensor([p.jitter or (1.0, 1.0, 1.0, 0.0) for p in ps],
                                       dtype=torch.float32).reshape(-1, 4),
                   gray=flags(lambda p: p.gray), blur_on=flags(lambda p: p.blur_sigma is not None),
                   blur_sigma=torch.tensor([p.blur_sigma or 0.0 for p in ps], dtype=torch.float32),
                   solarize=flags(lambda p: p.solarize))

    def crops(self, rows: slice) -> CropPlan:
        """The plan of some crops (same canvas)."""
        return replace(self, **{f.name: getattr(self, f.name)[rows] for f in fields(self) if f.name != "canvas"})


class BatchMultiCrop(MultiCropSpec):
    """Two global and ``local_crops_number`` local crops of each image of a batch.

    ``__call__(images, seeds)``: ``images`` are uint8 tensors (3, H_i, W_i) of any sizes, ``seeds`` one integer per
    image. Returns ``{"global": (2, B, 3, G, G), "local": (N, B, 3, L, L) or None}`` float tensors, normalised.
    The same in two halves: :meth:`plan` (the random choices, on the CPU) and :meth:`render` (tensor ops, on any
    device). Arguments and defaults: :class:`~dinov2_core.data.augmentations.MultiCropSpec`.
    """

    batched = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._norm: dict[torch.device, tuple[Tensor, Tensor]] = {}  # mean/std per device rendered on

    def __getstate__(self) -> dict[str, Any]:
        # a loader worker gets a copy: never the training process's GPU tensors (a spawned worker would map them)
        return {**self.__dict__, "_norm": {}}

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

    def plan(self, images: Sequence[Tensor], seeds: Sequence[int]) -> CropPlan:
        """Every random choice of the batch's crops (each image's from its own seed), with the images."""
        if len(images) != len(seeds):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        per_image = [self.sample(s, int(im.shape[-2]), int(im.shape[-1])) for im, s in zip(images, seeds)]
        crops = [(i, choices[c]) for c in range(2 + self.local_crops_number) for i, choices in enumerate(per_image)]
        return CropPlan.from_params(self._pad_stack(images), crops)

    # ------------------------------------------------------------------------------------------ ops
    @staticmethod
    def _pad_stack(images: Sequence[Tensor]) -> Tensor:
        """(B, 3, Hmax, Wmax) uint8; edges replicated so bilinear sampling at a border never sees zeros."""
        hmax = max(int(im.shape[-2]) for im in images)
        wmax = max(int(im.shape[-1]) for im in images)
        out = [im if im.shape[-2:] == (hmax, wmax) else
               F.pad(im[None], (0, wmax - im.shape[-1], 0, hmax - im.shape[-2]), mode="replicate")[0] for im in images]
        return torch.stack(out)

    def render(self, plan: CropPlan, device: torch.device | str | None = None) -> dict[str, Tensor | None]:
        """The crops of a plan, computed on ``device`` (default: the canvas's). The plan's parameters stay on the CPU:
        which crops are flipped, blurred... is decided there, so a GPU never waits on a host sync."""
        canvas = plan.canvas.to(device or plan.canvas.device, non_blocking=True).float().div_(255.0)
        b, n = plan.canvas.shape[0], self.local_crops_number
        g = self._render(canvas, plan.crops(slice(0, 2 * b)), self.global_crops_size).unflatten(0, (2, b))
        loc = None
        if n:
            loc = self._render(canvas, plan.crops(slice(2 * b, None)), self.local_crops_size).unflatten(0, (n, b))
        return {"global": g, "local": loc}

    def _render(self, canvas: Tensor, plan: CropPlan, size: int) -> Tensor:
        """The plan's crops of ``canvas`` (float in [0, 1]) -> (K, 3, size, size), normalised."""
        dev = canvas.device
        boxes = torch.cat([plan.image[:, None].float(), plan.box], dim=1).to(dev, non_blocking=True)
        x = roi_align(canvas, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        if (flips := _rows(plan.flip, dev)) is not None:
            x[flips] = x[flips].flip(-1)
        x = self._jitter(x, plan)
        if (gray := _rows(plan.gray, dev)) is not None:
            x[gray] = _luma(x[gray]).expand(-1, 3, -1, -1)
        if (blur := _rows(plan.blur_on, dev)) is not None:
            x[blur] = _gaussian_blur(x[blur], plan.blur_sigma[plan.blur_on])
        if (sol := _rows(plan.solarize, dev)) is not None:
            y = x[sol]
            x[sol] = torch.where(y >= 128 / 255, 1.0 - y, y)
        if dev not in self._norm:
            self._norm[dev] = (torch.tensor(self.mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1),
                               torch.tensor(self.std, dtype=torch.float32, device=dev).view(1, 3, 1, 1))
        mean, std = self._norm[dev]
        return (x - mean) / std

    @staticmethod
    def _jitter(x: Tensor, plan: CropPlan) -> Tensor:
        idx = _rows(plan.jitter_on, x.device)
        if idx is None:
            return x
        f_cpu = plan.jitter[plan.jitter_on]
        f = f_cpu.to(x.device, non_blocking=True)
        y = x[idx]
        view = (-1, 1, 1, 1)
        y = (y * f[:, 0].view(view)).clamp_(0, 1)  # brightness
        mean = _luma(y).mean(dim=(1, 2, 3), keepdim=True)
        y = ((y - mean) * f[:, 1].view(view) + mean).clamp_(0, 1)  # contrast
        gray = _luma(y)
        y = ((y - gray) * f[:, 2].view(view) + gray).clamp_(0, 1)  # saturation
        theta = f_cpu[:, 3].double() * 2 * math.pi  # hue: rotate (I, Q), the matrices built on the CPU
        cos, sin = torch.cos(theta), torch.sin(theta)
        rot = torch.zeros(len(f_cpu), 3, 3, dtype=torch.float64)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        m = (torch.from_numpy(_YIQ2RGB) @ rot @ torch.from_numpy(_RGB2YIQ)).float().to(x.device, non_blocking=True)
        y = torch.einsum("kij,kjhw->kihw", m, y).clamp_(0, 1)
        x[idx] = y
        return x

    def __call__(self, images: Sequence[Tensor], seeds: Sequence[int]) -> dict[str, Tensor | None]:
        return self.render(self.plan(images, seeds))


def renders_on(device: torch.device | str) -> str | None:
    """None when :meth:`BatchMultiCrop.render` runs on ``device``, else why not (a torchvision built without that
    device's kernels has no ``roi_align`` there)."""
    try:
        aug = BatchMultiCrop(local_crops_number=1, global_crops_size=14, local_crops_size=14)
        aug.render(aug.plan([torch.zeros(3, 16, 16, dtype=torch.uint8)], [0]), device)
        return None
    except (RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _rows(flags: Tensor, device: torch.device) -> Tensor | None:
    """Indices of the True flags (found on the CPU) on ``device``; None when there are none."""
    idx = flags.nonzero().flatten()
    return idx.to(device, non_blocking=True) if idx.numel() else None


def _luma(x: Tensor) -> Tensor:
    return (x[:, 0] * _LUMA[0] + x[:, 1] * _LUMA[1] + x[:, 2] * _LUMA[2]).unsqueeze(1)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int = 9) -> Tensor:
    """Separable Gaussian blur with one sigma per image (reflect padding, as torchvision's GaussianBlur)."""
    k, c, h, w = x.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, dtype=torch.float32)
    kern = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].float().cpu() ** 2))
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, dim=0).to(x.device)  # (k*c, kernel), from the CPU
    y = x.reshape(1, k * c, h, w)
    pad_h, pad_w = min(half, h - 1), min(half, w - 1)
    y = F.pad(y, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    kh = kern[:, half - pad_h: half + pad_h + 1]
    kw = kern[:, half - pad_w: half + pad_w + 1]
    y = F.conv2d(y, (kh / kh.sum(1, keepdim=True)).view(k * c, 1, -1, 1), groups=k * c)
    y = F.conv2d(y, (kw / kw.sum(1, keepdim=True)).view(k * c, 1, 1, -1), groups=k * c)
    return y.reshape(k, c, h, w)


__all__ = ["BatchMultiCrop", "CropParams", "CropPlan", "renders_on"]
