"""Image embedders for curation: a model-free copy-detection descriptor and a DINOv2-backbone embedder.

Copy-detection descriptor (stand-in for SSCD, which the paper uses in §3 / App. A and we cannot download)
--------------------------------------------------------------------------------------------------------
grey (ITU-R 601 luma) -> antialiased resize to 20x20 -> subtract mean (brightness) -> 2-D DCT-II, keep the
8x8 lowest frequencies -> weight coefficient (u, v) by (1 + u^2 + v^2), i.e. ~f^2, which undoes the 1/f
fall-off of image spectra so that mid frequencies (what tells two plain T-shirts apart) are not drowned by
the shared silhouette -> flip symmetrisation: a horizontal flip multiplies coefficients of odd horizontal
frequency by -1, so even-frequency coefficients are kept as they are and the odd ones ``a`` enter as the
upper triangle of ``a a^T / |a|`` (inner product ``(a.b)^2 / (|a||b|)``: sign-free, exactly flip invariant)
-> L2 normalisation (so contrast does not matter). Flat images (RMS < 1 grey level) get a reserved unit
vector: duplicates of each other and of nothing else. 560 dims; ~32k img/s on 28 px, 5-7k img/s on 256 px
inputs (benchmarks/curation_algos.py, 2 shared CPU cores).

Thresholds are the caller's: the pipeline's params state the defaults, and ``benchmarks/copy_detection.py``
measures them (Fashion-MNIST/photo re-upload bench, and held-out natural-photo corpora split by source).
Measured there: at cosine 0.988 on 5,000 Fashion-MNIST items + 780 photo tiles/faces with 600 re-uploads
(3 seeds) recall 0.955, pair precision 0.993; false pairs grow with the pool (look-alike "twins" multiply).

Limitation, measured: the descriptor is global, so crops that cut into the frame move it more than the gap
between distinct look-alike Fashion-MNIST items (raw-pixel cosine of distinct "twin" trousers reaches
0.989, while even a perfectly re-aligned 10 %-per-side crop copy -- lost border filled with background --
keeps only 0.78 descriptor cosine at its 5th percentile). At 0.988, copies whose only change is a shifted
crop are recalled 61 % of the time for crops <= 2 % per side, 2 % for <= 5 %, 0 % for <= 10 %. Lowering the
threshold far enough to catch them merges thousands of distinct items (at 0.9 pair precision is < 0.01).

Partial remedy, also measured: :func:`copy_detection_views` describes 4 centre crops (zooms) of each image
and dedup / decontamination link a view of A to the full descriptor of B. On benches where half of the
copies are also centre-cropped by 2-8 % per axis (what the demo-data stage plants), recall at 0.988 rises
from 0.47-0.50 to 0.91-0.93 with pair precision 0.988-0.996 (3 seeds); re-upload-only benches are
unchanged (views add no false pair there). Shifted (asymmetric) crops stay mostly undetected: 0.45 -> 0.50.

Local-feature verification of candidate pairs (:mod:`dinov2_core.curation.verify`) recovers most of the
copies the global descriptor misses on photos; it cannot help on thumbnails (28 px items).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

__all__ = [
    "CD_DIM",
    "CD_FREQS",
    "CD_SIZE",
    "CD_VIEW_CROPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneEmbedder",
    "CopyDetectionEmbedder",
    "EmbedderInfo",
    "copy_detection_descriptor",
    "copy_detection_views",
    "describe_embedder",
]

CD_SIZE = 20  # working resolution of the grey image (low-pass: a x0.5 re-upload of a 28 px item is 14 px)
CD_FREQS = 8  # keep DCT frequencies u, v < CD_FREQS
CD_ALPHA = -2.0  # coefficient weight (1 + u^2 + v^2) ** (-alpha / 2)
_FLAT_RMS = 1.0  # grey levels; below this an image has no structure to describe
# Centre-crop views (fraction removed per side, x / y) for crop-tolerant matching; on a 28 px item these are
# exactly the 1 and 2 px crops. Measured gain in benchmarks/copy_detection_corpora.py ("centre_crops" bench).
CD_VIEW_CROPS = ((0.035, 0.035), (0.035, 0.07), (0.07, 0.035), (0.07, 0.07))

_N_EVEN = CD_FREQS * ((CD_FREQS + 1) // 2) - 1  # even horizontal frequency, DC excluded
_N_ODD = CD_FREQS * (CD_FREQS // 2)
CD_DIM = _N_EVEN + _N_ODD * (_N_ODD + 1) // 2 + 1  # + 1 reserved "flat image" dimension

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EmbedderInfo:
    """What produced a set of embeddings, for stage metrics and provenance."""

    name: str
    dim: int
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _to_pil(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return img
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr)


def _grey(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "F"):  # 16-bit / float scans: rescale instead of clipping
        return _to_pil(np.asarray(img, dtype=np.float64))
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent -> white, like a browser
        img = Image.alpha_composite(bg, img)
    return img.convert("L")


def _dct_matrix(n: int, k: int) -> np.ndarray:
    x = np.arange(n)
    u = np.arange(k)[:, None]
    d = np.cos(np.pi * (2 * x + 1) * u / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.astype(np.float32)


_DCT = _dct_matrix(CD_SIZE, CD_FREQS)
_U, _V = np.meshgrid(np.arange(CD_FREQS), np.arange(CD_FREQS), indexing="ij")
_WEIGHT = ((1.0 + _U**2 + _V**2) ** (-CD_ALPHA / 2)).astype(np.float32)
_EVEN = (_V % 2 == 0) & ~((_U == 0) & (_V == 0))
_ODD = _V % 2 == 1
_TRIU = np.triu_indices(_N_ODD)
_TRIU_SCALE = np.where(_TRIU[0] == _TRIU[1], 1.0, math.sqrt(2.0)).astype(np.float32)


def _describe_grey(greys: Sequence[Image.Image]) -> np.ndarray:
    x = np.stack(
        [np.asarray(g.resize((CD_SIZE, CD_SIZE), Image.Resampling.BILINEAR), np.float32) for g in greys]
    )
    x -= x.mean(axis=(1, 2), keepdims=True)
    rms = np.sqrt((x**2).mean(axis=(1, 2)))
    flat = rms < _FLAT_RMS
    x /= np.maximum(rms, _FLAT_RMS)[:, None, None]
    coef = (_DCT @ x @ _DCT.T) * _WEIGHT  # [n, K, K], u = vertical, v = horizontal frequency
    even = coef[:, _EVEN]
    odd = coef[:, _ODD]
    odd_norm = np.linalg.norm(odd, axis=1, keepdims=True)
    outer = odd[:, _TRIU[0]] * odd[:, _TRIU[1]] * _TRIU_SCALE / np.maximum(odd_norm, 1e-12)
    out = np.concatenate([even, outer, np.zeros((len(x), 1), np.float32)], axis=1)
    out[flat] = 0.0
    out[flat, -1] = 1.0
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out.astype(np.float32)


def copy_detection_descriptor(
    images: Sequence[Any], *, batch_size: int = 1024, progress: bool = False
) -> np.ndarray:
    """Flip-invariant, L2-normalised copy-detection descriptors, float32 [N, CD_DIM].

    ``images``: PIL images or uint8 arrays (HxW or HxWxC), any size and colour mode. Deterministic and
    independent of batch composition (each image is described on its own).
    """
    n = len(images)
    out = np.empty((n, CD_DIM), dtype=np.float32)
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc="copy-detection descriptor", unit="batch", disable=not progress):
        out[s : s + batch_size] = _describe_grey([_grey(_to_pil(im)) for im in images[s : s + batch_size]])
    return out


def _centre_crop(img: Image.Image, fx: float, fy: float) -> Image.Image | None:
    w, h = img.size
    dx, dy = max(1, round(w * fx)), max(1, round(h * fy))
    if w - 2 * dx < 2 or h - 2 * dy < 2:
        return None
    return img.crop((dx, dy, w - dx, h - dy))


def copy_detection_views(
    images: Sequence[Any],
    crops: Sequence[tuple[float, float]] = CD_VIEW_CROPS,
    *,
    batch_size: int = 1024,
    progress: bool = False,
) -> np.ndarray:
    """Descriptors of centre-cropped views of each image, float32 [V, N, CD_DIM] (V = len(crops)).

    The global descriptor is not crop invariant (see module docstring), so dedup / decontamination can
    additionally link a view of image A to the full descriptor of image B: B is then a centre crop (zoom) of
    A. ``crops`` are (x, y) fractions removed per side (at least 1 px). Views too small to crop, or that
    become flat while the full image is not, are zero vectors and match nothing.
    """
    n = len(images)
    out = np.zeros((len(crops), n, CD_DIM), dtype=np.float32)
    starts = range(0, n, batch_size)
    for s in tqdm(starts, desc="copy-detection views", unit="batch", disable=not progress):
        greys = [_grey(_to_pil(im)) for im in images[s : s + batch_size]]
        base_flat = _describe_grey(greys)[:, -1] == 1.0
        for v, (fx, fy) in enumerate(crops):
            views = [_centre_crop(g, fx, fy) for g in greys]
            ok = np.array([vw is not None for vw in views]) & ~base_flat
            if not ok.any():
                continue
            desc = _describe_grey([vw for vw, good in zip(views, ok) if good])
            desc[desc[:, -1] == 1.0] = 0.0  # a flat crop of a textured image says nothing
            out[v, s + np.flatnonzero(ok)] = desc
    return out


class CopyDetectionEmbedder:
    """Object wrapper of :func:`copy_detection_descriptor` with the same interface as BackboneEmbedder."""

    name = "copy_detection_dct_v1"
    dim = CD_DIM

    def __init__(self, batch_size: int = 1024, progress: bool = True):
        self.batch_size = batch_size
        self.progress = progress

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        return copy_detection_descriptor(images, batch_size=self.batch_size, progress=self.progress)

    def embed_views(self, images: Sequence[Any]) -> np.ndarray:
        return copy_detection_views(images, batch_size=self.batch_size, progress=self.progress)

    def describe(self) -> EmbedderInfo:
        return EmbedderInfo(
            self.name,
            CD_DIM,
            {
                "size": CD_SIZE,
                "freqs": CD_FREQS,
                "alpha": CD_ALPHA,
                "flip_invariant": True,
                "view_crops": [list(c) for c in CD_VIEW_CROPS],
            },
        )


class BackboneEmbedder:
    """L2-normalised CLS features of a DINOv2-style backbone (anything with ``forward_features(x)`` returning
    a dict with ``"x_norm_clstoken"``), used for retrieval and clustering (paper §3, ViT-H/16 there).

    Images are resized (shorter side) and centre-cropped to ``image_size`` rounded to a multiple of
    ``patch_size`` (so the ViT sees whole patches), then ImageNet-normalised.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        image_size: int = 224,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        *,
        patch_size: int = 14,
        center_crop: bool = True,
        progress: bool = True,
        name: str | None = None,
    ):
        if not hasattr(model, "forward_features"):
            raise TypeError(f"{type(model).__name__} has no forward_features(); not a DINOv2-style backbone")
        self.model = model
        self.patch_size = patch_size
        self.image_size = max(patch_size, round(image_size / patch_size) * patch_size)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.center_crop = center_crop
        self.progress = progress
        self.name = name or f"dinov2_backbone:{type(model).__name__}"
        self._dim: int | None = getattr(model, "embed_dim", None)
        self._mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    @property
    def dim(self) -> int | None:
        return self._dim

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Float tensor [N, 3, S, S], S = self.image_size, ImageNet-normalised."""
        s = self.image_size
        batch = []
        for im in images:
            im = _to_pil(im).convert("RGB")
            if self.center_crop:
                scale = s / min(im.size)
                w, h = max(s, round(im.width * scale)), max(s, round(im.height * scale))
                im = im.resize((w, h), Image.Resampling.BICUBIC)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
            else:
                im = im.resize((s, s), Image.Resampling.BICUBIC)
            batch.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
        x = torch.stack(batch).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean) / self._std

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """float32 [N, dim], unit L2 norm."""
        n = len(images)
        chunks: list[np.ndarray] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                starts = range(0, n, self.batch_size)
                for s in tqdm(starts, desc=self.name, unit="batch", disable=not self.progress):
                    x = self.preprocess(images[s : s + self.batch_size]).to(self.device)
                    feats = self.model.forward_features(x)["x_norm_clstoken"]
                    feats = F.normalize(feats.float(), dim=-1)
                    chunks.append(feats.cpu().numpy())
        finally:
            self.model.train(was_training)
        if not chunks:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        out = np.concatenate(chunks).astype(np.float32, copy=False)
        self._dim = out.shape[1]
        return out

    def describe(self) -> EmbedderInfo:
        n_params = sum(p.numel() for p in self.model.parameters())
        return EmbedderInfo(
            self.name,
            int(self._dim) if self._dim else -1,
            {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "center_crop": self.center_crop,
                "n_params": int(n_params),
                "normalisation": "imagenet",
                "feature": "x_norm_clstoken",
            },
        )


def describe_embedder(embedder: Any) -> EmbedderInfo:
    """Provenance record of an embedder object, or of the copy-detection descriptor function."""
    if embedder is copy_detection_descriptor or embedder is None:
        return CopyDetectionEmbedder().describe()
    if hasattr(embedder, "describe"):
        return embedder.describe()
    raise TypeError(f"cannot describe {type(embedder).__name__}: no describe() method")
