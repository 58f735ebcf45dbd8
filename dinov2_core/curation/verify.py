"""Geometric verification of candidate copy pairs with local features (OpenCV SIFT + RANSAC).

A global descriptor ranks a copy's source among its first few neighbours but cannot separate a copy from a
look-alike (two tiles of one photo, two shirts) by a similarity threshold alone. Copy detection systems
therefore re-check candidate pairs with local features (the verification stage of image retrieval, Philbin
et al. 2007; used by the Image Similarity Challenge baselines, Douze et al. 2021): a copy is the same
pixels under a similarity transform (resize, slight crop, shift), so many keypoint matches agree on one
such transform, and the aligned pixels correlate; a look-alike's matches do not.

Checks, in order: SIFT on both images at a common size (contrast-stretched, so dim and hazy photos get
keypoints), Lowe's ratio test with one match per keypoint, a RANSAC similarity transform that is plausible
for a re-upload (rotation <= 10 deg, scale ~1 at the common size, frames overlap >= 70 %), the number of
RANSAC inliers and the correlation of the aligned pixels. Mirrored copies are tried against the mirror.
A pair the keypoints reject can still be shown a copy by a dense check that needs no keypoints (plain,
heavily re-encoded photos: :func:`dense_similarity`). Per pair the verdict is three-valued: ``1`` copy,
``-1`` not shown to be a copy, ``0`` cannot tell (an image too small for either check, e.g. a 28 px
thumbnail). The decision thresholds (inliers, pixel correlation, dense score) are the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["LocalFeatures", "PairVerifier", "dense_similarity", "local_features", "measure_pair", "verify_pair"]

WORK_SIDE = 256  # longer side images are resized to before SIFT: small thumbnails gain keypoints, big ones cost less
MIN_SIDE = 40  # images under MIN_SIDE^2 pixels are "cannot tell" (28 px Fashion-MNIST items)
MIN_KEYPOINTS = 6  # fewer than this on either side: "cannot tell"
CONTRAST = 0.004  # SIFT contrast threshold (OpenCV default 0.04): low-contrast photo regions still get keypoints
RATIO = 0.8  # Lowe's ratio test (Lowe 2004, §7.1)
RANSAC_PX = 4.0  # reprojection tolerance in WORK_SIDE pixels
MAX_ROTATION_DEG = 10.0  # re-uploads are not rotated; a larger fitted rotation is a chance alignment
MIN_OVERLAP = 0.7  # share of the smaller frame that the fitted transform must overlap in the other
MAX_SCALE_CHANGE = 1.25  # both images are at WORK_SIDE, so a copy (resized, <= ~10 % cropped) maps at scale ~1
DENSE_SIDE = 128  # longer side of the dense check's images (ECC alignment, band-passed correlation)
DENSE_BAND = (1.0, 3.0)  # difference-of-Gaussians sigmas at DENSE_SIDE: detail JPEG keeps, plain gradients do not have
MAX_ANISOTROPY = 1.15  # dense alignment: ratio of the two scale factors (re-framing changes aspect by <= ~10 %)


def _too_small(w: int, h: int) -> bool:
    """Below MIN_SIDE x MIN_SIDE pixels (or thinner than a text line) local features say nothing."""
    return w * h < MIN_SIDE * MIN_SIDE or min(w, h) < MIN_SIDE // 2


_EMPTY = (np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32))


@dataclass(frozen=True)
class LocalFeatures:
    """SIFT keypoints (x, y in work pixels) and descriptors of an image and of its mirror image."""

    size: tuple[int, int]  # (width, height) of the work image
    grey: np.ndarray  # the work image, for the photometric check
    xy: np.ndarray
    desc: np.ndarray
    xy_mirror: np.ndarray
    desc_mirror: np.ndarray
    usable: bool


def _grey_array(img: Any) -> np.ndarray:
    from PIL import Image

    from .embed import _grey, _to_pil

    g = _grey(_to_pil(img))
    scale = WORK_SIDE / max(g.size)
    size = (max(1, round(g.width * scale)), max(1, round(g.height * scale)))
    a = np.asarray(
        g.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS), np.float32
    )
    lo, hi = np.percentile(a, (1, 99))  # stretch: a hazy or dim photo gets the keypoints a crisp one does
    return np.clip((a - lo) * (255.0 / max(hi - lo, 1.0)), 0, 255).astype(np.uint8)


def local_features(img: Any, *, n_features: int = 400) -> LocalFeatures:
    """SIFT features of ``img`` (PIL image or array) and of its mirror, at a normalised scale."""
    import cv2

    w0, h0 = img.shape[1::-1] if isinstance(img, np.ndarray) else img.size
    if _too_small(w0, h0):  # a thumbnail: nothing to verify with, skip the work
        return LocalFeatures((int(w0), int(h0)), np.zeros((0, 0), np.uint8), *_EMPTY, *_EMPTY, False)
    g = _grey_array(img)
    sift = cv2.SIFT_create(nfeatures=n_features, contrastThreshold=CONTRAST)

    def detect(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        kps, desc = sift.detectAndCompute(a, None)
        if desc is None or not kps:
            return _EMPTY
        return np.array([k.pt for k in kps], np.float32), desc.astype(np.float32)

    xy, desc = detect(g)
    xym, descm = detect(np.ascontiguousarray(g[:, ::-1]))
    usable = len(xy) >= MIN_KEYPOINTS
    return LocalFeatures((g.shape[1], g.shape[0]), g, xy, desc, xym, descm, usable)


def _match(a_desc: np.ndarray, b_desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    if len(a_desc) < 2 or len(b_desc) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(a_desc, b_desc, k=2)
    good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
    # one match per keypoint of B (the closest): many query points piling onto one point of B would let
    # RANSAC "fit" a degenerate transform that maps everything to that point
    good.sort(key=lambda m: m.distance)
    seen: set[int] = set()
    unique = [m for m in good if not (m.trainIdx in seen or seen.add(m.trainIdx))]
    return np.array([m.queryIdx for m in unique], np.int64), np.array([m.trainIdx for m in unique], np.int64)


def _overlap(m: np.ndarray, a_size: tuple[int, int], b_size: tuple[int, int]) -> float:
    """Share of the smaller of (A mapped into B, B) covered by their intersection (boxes, no rotation)."""
    w, h = a_size
    corners = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], np.float64) @ m.T
    x0, y0 = corners.min(axis=0)
    x1, y1 = corners.max(axis=0)
    ix = max(0.0, min(x1, b_size[0]) - max(x0, 0.0))
    iy = max(0.0, min(y1, b_size[1]) - max(y0, 0.0))
    smaller = min((x1 - x0) * (y1 - y0), b_size[0] * b_size[1])
    return float(ix * iy / smaller) if smaller > 0 else 0.0


def _ncc(a_grey: np.ndarray, b_grey: np.ndarray, m: np.ndarray) -> float:
    """Normalised cross-correlation of B and A warped onto B by ``m``, over their overlap (blurred, so JPEG
    blocking and resampling do not count)."""
    import cv2

    h, w = b_grey.shape
    warped = cv2.warpAffine(a_grey.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR, borderValue=-1.0)
    inside = cv2.warpAffine(np.ones_like(a_grey, np.float32), m, (w, h), flags=cv2.INTER_NEAREST) > 0.5
    if inside.sum() < 64:
        return 0.0
    x = cv2.GaussianBlur(warped, (0, 0), 1.5)[inside]
    y = cv2.GaussianBlur(b_grey.astype(np.float32), (0, 0), 1.5)[inside]
    x, y = x - x.mean(), y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else 0.0


def _fit(a: LocalFeatures, b: LocalFeatures, mirrored: bool) -> tuple[int, float]:
    """(RANSAC inliers, aligned-pixel correlation) of the best similarity transform from A (or its mirror)
    to B; (0, 0) when no plausible re-upload transform (small rotation, scale ~1, large overlap) fits."""
    import cv2

    a_xy, a_desc = (a.xy_mirror, a.desc_mirror) if mirrored else (a.xy, a.desc)
    qi, ti = _match(a_desc, b.desc)
    if qi.size < 3:
        return 0, 0.0
    m, mask = cv2.estimateAffinePartial2D(
        a_xy[qi],
        b.xy[ti],
        method=cv2.RANSAC,
        ransacReprojThreshold=RANSAC_PX,
        maxIters=2000,
        confidence=0.995,
    )
    if m is None or mask is None:
        return 0, 0.0
    angle = np.degrees(np.arctan2(m[1, 0], m[0, 0]))
    scale = float(np.hypot(m[0, 0], m[1, 0]))
    if abs(angle) > MAX_ROTATION_DEG or not 1 / MAX_SCALE_CHANGE <= scale <= MAX_SCALE_CHANGE:
        return 0, 0.0
    if _overlap(m, a.size, b.size) < MIN_OVERLAP:
        return 0, 0.0
    a_grey = np.ascontiguousarray(a.grey[:, ::-1]) if mirrored else a.grey
    return int(mask.sum()), _ncc(a_grey, b.grey, m)


def _bandpass(a: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.GaussianBlur(a, (0, 0), DENSE_BAND[0]) - cv2.GaussianBlur(a, (0, 0), DENSE_BAND[1])


def _plausible_affine(w: np.ndarray) -> bool:
    """A re-upload maps to the original by a near-similarity: scale ~1, little rotation, little shear."""
    s = np.linalg.svd(w[:, :2], compute_uv=False)
    angle = np.degrees(np.arctan2(w[1, 0] - w[0, 1], w[0, 0] + w[1, 1]))
    return bool(
        1 / MAX_SCALE_CHANGE <= s[1] <= s[0] <= MAX_SCALE_CHANGE
        and s[0] / s[1] <= MAX_ANISOTROPY
        and abs(angle) <= MAX_ROTATION_DEG
    )


def _dense_fit(a_grey: np.ndarray, b_grey: np.ndarray) -> float:
    """Band-passed correlation of B and A after aligning A to B by ECC (Evangelidis & Psarakis 2008), coarse
    to fine from the identity: a re-upload at a common size is a few-percent re-framing away from it."""
    import cv2

    h, w = b_grey.shape
    f = DENSE_SIDE / max(h, w)
    size = (max(16, round(w * f)), max(16, round(h * f)))
    b = cv2.resize(b_grey, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    a = cv2.resize(a_grey, size, interpolation=cv2.INTER_AREA).astype(np.float32)
    warp = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 50, 1e-5)
    try:
        for level in (2, 1):  # half size, then full size
            bl = cv2.resize(b, (size[0] // level, size[1] // level), interpolation=cv2.INTER_AREA)
            al = cv2.resize(a, (size[0] // level, size[1] // level), interpolation=cv2.INTER_AREA)
            if level == 1:
                warp[:, 2] *= 2
            _, warp = cv2.findTransformECC(bl, al, warp, cv2.MOTION_AFFINE, criteria, None, 3)
    except cv2.error:  # no convergence: the pixels do not align
        return 0.0
    if not _plausible_affine(warp):
        return 0.0
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(a, warp, size, flags=flags)
    inside = cv2.warpAffine(np.ones_like(a), warp, size, flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    margin = int(np.ceil(3 * DENSE_BAND[1]))  # the band-pass of pixels near the frame's edge sees the border
    inside = cv2.erode(inside, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)) > 0.5
    if inside.sum() < MIN_OVERLAP * size[0] * size[1] * 0.5:  # the margin alone takes ~1/4 of a full overlap
        return 0.0
    x, y = _bandpass(warped)[inside], _bandpass(b)[inside]
    x, y = x - x.mean(), y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else 0.0


def dense_similarity(a: LocalFeatures, b: LocalFeatures) -> float:
    """Best band-passed correlation of B with A or A's mirror after dense alignment; 0.0 when either image is
    a thumbnail or no plausible re-upload transform aligns them.

    The keypoint check fails on plain, low-texture photos re-encoded as heavy JPEG: the copy's keypoints sit
    on block artefacts and the original's on faint gradients, so no transform gets inliers. A dense
    alignment needs no keypoints, and the band-passed pixels (detail at a few work pixels) separate the
    same picture from an adjacent tile of one smooth photo, which plain pixels do not.
    """
    if a.grey.size == 0 or b.grey.size == 0:
        return 0.0
    return max(_dense_fit(a.grey, b.grey), _dense_fit(np.ascontiguousarray(a.grey[:, ::-1]), b.grey))


def measure_pair(a: LocalFeatures, b: LocalFeatures) -> tuple[bool, int, float]:
    """(judgeable, inliers, correlation) of the better of the direct and the mirrored fit."""
    if not (a.usable and b.usable):
        return False, 0, 0.0
    inl, ncc = max(_fit(a, b, False), _fit(a, b, True))
    return True, inl, ncc


def verify_pair(a: LocalFeatures, b: LocalFeatures, min_inliers: int, min_ncc: float) -> tuple[int, int]:
    """(verdict, inliers): 1 copy / -1 not a copy / 0 cannot tell, and the best RANSAC inlier count."""
    ok, inl, ncc = measure_pair(a, b)
    if not ok:
        return 0, 0
    return (1 if inl >= min_inliers and ncc >= min_ncc else -1), inl


class PairVerifier:
    """Verdicts for index pairs of an image collection; features are computed lazily, once per image.

    ``min_inliers`` and ``min_ncc`` (aligned-pixel correlation) decide the keypoint check; ``min_dense`` (None:
    off) the dense check, which runs only on the pairs the keypoint check did not accept. All are the caller's
    calibrated thresholds (the pipeline's params state the defaults).
    """

    def __init__(
        self,
        load: Callable[[int], Any],
        *,
        min_inliers: int,
        min_ncc: float,
        min_dense: float | None = None,
        n_features: int = 400,
        sizes: np.ndarray | None = None,
    ):
        self.load = load
        self.min_inliers = min_inliers
        self.min_ncc = min_ncc
        self.min_dense = min_dense
        self.n_features = n_features
        self.sizes = (
            None if sizes is None else np.asarray(sizes)
        )  # [N, 2] (width, height): skip thumbnails unread
        self._cache: dict[int, LocalFeatures] = {}
        self.n_dense_checked = 0
        self.n_dense_copies = 0

    def features(self, i: int) -> LocalFeatures:
        if i not in self._cache:
            if self.sizes is not None and _too_small(*self.sizes[i]):
                w, h = (int(v) for v in self.sizes[i])
                self._cache[i] = LocalFeatures((w, h), np.zeros((0, 0), np.uint8), *_EMPTY, *_EMPTY, False)
            else:
                self._cache[i] = local_features(self.load(int(i)), n_features=self.n_features)
        return self._cache[i]

    def measure(self, src: Sequence[int], dst: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pair ``src[i] -- dst[i]``: judgeable (bool), RANSAC inliers (int32), aligned correlation."""
        ok = np.zeros(len(src), bool)
        inliers = np.zeros(len(src), np.int32)
        ncc = np.zeros(len(src), np.float32)
        for j, (s, d) in enumerate(zip(np.asarray(src).tolist(), np.asarray(dst).tolist())):
            ok[j], inliers[j], ncc[j] = measure_pair(self.features(s), self.features(d))
        return ok, inliers, ncc

    def measure_dense(self, src: Sequence[int], dst: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per pair: judgeable by the dense check (neither image a thumbnail) and its score."""
        ok = np.zeros(len(src), bool)
        score = np.zeros(len(src), np.float32)
        for j, (s, d) in enumerate(zip(np.asarray(src).tolist(), np.asarray(dst).tolist())):
            a, b = self.features(s), self.features(d)
            ok[j] = a.grey.size > 0 and b.grey.size > 0
            score[j] = dense_similarity(a, b) if ok[j] else 0.0
        return ok, score

    def __call__(self, src: Sequence[int], dst: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Verdicts (int8: 1 copy, -1 not, 0 cannot tell) and inlier counts of the pairs ``src[i] -- dst[i]``."""
        src, dst = np.asarray(src), np.asarray(dst)
        ok, inliers, ncc = self.measure(src, dst)
        copy = ok & (inliers >= self.min_inliers) & (ncc >= self.min_ncc)
        if self.min_dense is not None:
            rest = np.flatnonzero(~copy)
            dense_ok, score = self.measure_dense(src[rest], dst[rest])
            ok[rest] |= dense_ok
            dense_copy = dense_ok & (score >= self.min_dense)
            copy[rest[dense_copy]] = True
            self.n_dense_checked += int(dense_ok.sum())
            self.n_dense_copies += int(dense_copy.sum())
        return np.where(copy, 1, np.where(ok, -1, 0)).astype(np.int8), inliers

    @property
    def n_images_described(self) -> int:
        return len(self._cache)
