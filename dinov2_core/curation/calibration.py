"""Copy-detection calibration bench: real distinct images + synthetic near-duplicates, and the metrics that
pick the dedup / decontamination thresholds of :mod:`dinov2_core.curation.embed`.

The paper (§3, App. A) thresholds SSCD cosine similarities at 0.6 (dedup) and 0.45 (decontamination).
Our descriptor is different, so its thresholds are measured here instead of copied:

* recall          -- fraction of near-duplicates that land in the same connected component as their source;
* pair precision  -- among all pairs of images sharing a component, the fraction that are truly copies of
                     the same source (merging two distinct T-shirts costs as many pairs as it creates).

Run ``python -m dinov2_core.curation.calibration`` to reproduce the figures in ``embed.py``.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .components import connected_components, knn_edges
from .knn import knn_search

__all__ = [
    "FASHION_MNIST_ROOT",
    "REUPLOAD",
    "TRANSFORMS",
    "CopyDetectionBench",
    "build_copy_detection_bench",
    "choose_threshold",
    "eval_match_rates",
    "evaluate_thresholds",
    "load_fashion_mnist",
    "natural_tiles",
    "near_duplicate",
    "per_transform_recall",
    "random_recipe",
    "run_calibration",
]

FASHION_MNIST_ROOT = Path(os.environ.get("FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist"))

# Near-duplicate transforms the descriptor must survive (brief / typical web re-uploads).
SCALE_RANGE = (0.5, 2.0)
JPEG_QUALITY_RANGE = (30, 95)
MAX_CROP_PER_SIDE = 0.10
CENTRE_CROP_RANGE = (0.02, 0.08)  # symmetric re-framing, per axis (>= 1 px), like the demo-data stage plants
TRANSFORMS = ("crop", "centre_crop", "flip", "grey", "resize", "jpeg")


def load_fashion_mnist(
    root: str | Path = FASHION_MNIST_ROOT, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, 28, 28] and labels uint8 [N] from the gzip IDX files."""
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}[split]
    root = Path(root)
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels


_NATURAL = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "brick",
    "grass",
    "gravel",
    "camera",
    "coins",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "clock",
    "page",
    "text",
    "cell",
    "stereo_motorcycle",
    "microaneurysms",
)


def natural_tiles(tile: int = 96, stride: int | None = None) -> list[Image.Image]:
    """Non-overlapping ``tile`` x ``tile`` crops of the photos bundled with scikit-image (distinct items).

    Includes repetitive textures (brick, grass, gravel) and text pages, whose tiles look alike at low
    resolution -- hard negatives for a global descriptor.
    """
    import skimage.data as skd

    stride = stride or tile
    out: list[Image.Image] = []
    for name in _NATURAL:
        try:
            arr = getattr(skd, name)()
        except (ImportError, OSError):  # some skimage images need pooch + a download; skip them offline
            continue
        if isinstance(arr, tuple):
            arr = arr[0]
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            arr = (255 * (arr.astype(np.float64) / max(float(arr.max()), 1e-9))).astype(np.uint8)
        if arr.ndim == 3:
            arr = arr[..., :3]
        h, w = arr.shape[:2]
        for y in range(0, h - tile + 1, stride):
            for x in range(0, w - tile + 1, stride):
                crop = arr[y : y + tile, x : x + tile]
                if crop.std() < 4.0:  # flat regions (sky, background) are not meaningful items
                    continue
                out.append(Image.fromarray(crop))
    return out


def near_duplicate(
    img: Image.Image,
    rng: np.random.Generator,
    *,
    transforms: Sequence[str] = TRANSFORMS,
    scale_range: tuple[float, float] = SCALE_RANGE,
    jpeg_range: tuple[int, int] = JPEG_QUALITY_RANGE,
    max_crop: float = MAX_CROP_PER_SIDE,
) -> tuple[Image.Image, dict]:
    """A re-upload of ``img`` applying ``transforms`` (subset of :data:`TRANSFORMS`, in that order) with
    random strengths: independent per-side crop (re-framing with a shift), symmetric centre crop (a zoom),
    h-flip, colour->grey, resize, JPEG. Returns (image, params)."""
    unknown = set(transforms) - set(TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown transforms {sorted(unknown)}; choose from {TRANSFORMS}")
    params: dict = {"transforms": "+".join(t for t in TRANSFORMS if t in transforms)}
    if "crop" in transforms:
        w, h = img.size
        l, t, r, b = (rng.uniform(0, max_crop, size=4) * [w, h, w, h]).round().astype(int)
        img = img.crop((l, t, w - r, h - b))
        params["crop"] = (int(l), int(t), int(r), int(b))
    if "centre_crop" in transforms:
        w, h = img.size
        fx, fy = rng.uniform(*CENTRE_CROP_RANGE, size=2)
        dx, dy = max(1, round(w * fx)), max(1, round(h * fy))
        img = img.crop((dx, dy, w - dx, h - dy))
        params["centre_crop"] = (int(dx), int(dy))
    if "flip" in transforms:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        params["flip"] = True
    if "grey" in transforms:
        img = img.convert("L")
        params["grey"] = True
    if "resize" in transforms:
        scale = float(np.exp(rng.uniform(np.log(scale_range[0]), np.log(scale_range[1]))))
        size = (max(2, round(img.width * scale)), max(2, round(img.height * scale)))
        resample = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)[
            rng.integers(3)
        ]
        img = img.resize(size, resample)
        params["scale"] = round(scale, 3)
    if "jpeg" in transforms:
        quality = int(rng.integers(jpeg_range[0], jpeg_range[1] + 1))
        buf = io.BytesIO()
        img.convert("L" if img.mode == "L" else "RGB").save(buf, format="JPEG", quality=quality)
        img = Image.open(io.BytesIO(buf.getvalue()))
        img.load()
        params["quality"] = quality
    return img, params


def random_recipe(
    rng: np.random.Generator, p: float = 0.5, transforms: Sequence[str] = TRANSFORMS
) -> tuple[str, ...]:
    """Each transform independently with probability ``p``; at least one (re-upload changes something)."""
    while True:
        chosen = tuple(t for t in transforms if rng.random() < p)
        if chosen:
            return chosen


@dataclass
class CopyDetectionBench:
    """Distinct originals followed by near-duplicate copies. ``source[i]`` is the original's index."""

    images: list[Image.Image]
    source: np.ndarray  # int64 [N]; originals point to themselves
    is_copy: np.ndarray  # bool [N]
    origin: np.ndarray  # str [N]: "fashion_mnist" | "natural" | "lfw"
    params: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def summary(self) -> dict:
        return {
            "n_images": len(self),
            "n_distinct": int((~self.is_copy).sum()),
            "n_copies": int(self.is_copy.sum()),
            **{
                f"n_distinct_{o}": int(((self.origin == o) & ~self.is_copy).sum())
                for o in np.unique(self.origin)
            },
            **{
                f"n_copies_{o}": int(((self.origin == o) & self.is_copy).sum())
                for o in np.unique(self.origin)
            },
        }


def build_copy_detection_bench(
    fashion_images: np.ndarray | None,
    *,
    n_distinct: int = 5000,
    n_copies: int = 500,
    natural: bool = True,
    natural_copies: int = 100,
    recipe: str | Sequence[str] = "random",
    transforms: Sequence[str] = TRANSFORMS,
    seed: int = 0,
) -> CopyDetectionBench:
    """Sample ``n_distinct`` Fashion-MNIST items (+ natural tiles and LFW faces) and copy some of them.

    ``recipe``: "random" (each transform with p=0.5, see :func:`random_recipe`), "all" (every transform
    compounded -- the worst case) or an explicit tuple of transform names.
    """
    rng = np.random.default_rng(seed)
    originals: list[Image.Image] = []
    origin: list[str] = []
    if fashion_images is not None and n_distinct:
        idx = np.sort(rng.choice(len(fashion_images), size=n_distinct, replace=False))
        originals += [Image.fromarray(fashion_images[i]) for i in idx]
        origin += ["fashion_mnist"] * len(idx)
    n_fashion = len(originals)
    if natural:
        tiles = natural_tiles()
        originals += tiles
        origin += ["natural"] * len(tiles)
        try:
            import skimage.data as skd

            faces = skd.lfw_subset()  # 200 aligned 25x25 faces: distinct people that look alike
            faces = [Image.fromarray((255 * f / max(f.max(), 1e-9)).astype(np.uint8)) for f in faces]
            originals += faces
            origin += ["lfw"] * len(faces)
        except (ImportError, OSError):  # not bundled with this scikit-image install
            pass
    n = len(originals)
    src_fashion = rng.choice(n_fashion, size=min(n_copies, n_fashion), replace=False) if n_fashion else []
    src_other = (
        rng.choice(np.arange(n_fashion, n), size=min(natural_copies, n - n_fashion), replace=False)
        if n > n_fashion
        else []
    )
    sources = np.concatenate([np.asarray(src_fashion, dtype=np.int64), np.asarray(src_other, dtype=np.int64)])
    images, params = list(originals), [{} for _ in originals]
    for s in sources:
        if recipe == "random":
            chosen = random_recipe(rng, transforms=transforms)
        elif recipe == "all":
            chosen = tuple(transforms)
        else:
            chosen = tuple(recipe)
        img, p = near_duplicate(originals[s], rng, transforms=chosen)
        images.append(img)
        params.append(p)
    source = np.concatenate([np.arange(n), sources]).astype(np.int64)
    is_copy = np.concatenate([np.zeros(n, bool), np.ones(len(sources), bool)])
    origin_arr = np.asarray(origin + [origin[s] for s in sources])
    return CopyDetectionBench(images, source, is_copy, origin_arr, params)


def _pair_counts(labels: np.ndarray, source: np.ndarray) -> tuple[int, int]:
    """(pairs sharing a component, of which pairs sharing a source)."""
    comp_sizes = np.bincount(labels)
    all_pairs = int((comp_sizes * (comp_sizes - 1) // 2).sum())
    _, joint = np.unique(np.stack([labels, source]), axis=1, return_counts=True)
    true_pairs = int((joint * (joint - 1) // 2).sum())
    return all_pairs, true_pairs


def evaluate_thresholds(
    embeddings: np.ndarray,
    source: np.ndarray,
    is_copy: np.ndarray,
    thresholds: Sequence[float],
    *,
    k: int = 64,
    views: np.ndarray | None = None,
) -> pd.DataFrame:
    """Recall / pair precision of dedup-by-components at each threshold (graph computed once).
    ``views`` adds view->image edges as :func:`~dinov2_core.curation.dedup.deduplicate` does."""
    from .dedup import VIEW_K, view_edges

    n = len(embeddings)
    knn = knn_search(embeddings, k=min(k, n - 1))
    src, dst, sim = knn_edges(knn.sims, knn.ids, -np.inf)
    if views is not None:
        vs, vd, vsim, _ = view_edges(embeddings, views, float(min(thresholds)), k=VIEW_K)
        src, dst, sim = np.concatenate([src, vs]), np.concatenate([dst, vd]), np.concatenate([sim, vsim])
    source = np.asarray(source)
    rows = []
    for t in thresholds:
        keep = sim > np.float32(t)
        labels = connected_components(n, src[keep], dst[keep])
        recall = float((labels[is_copy] == labels[source[is_copy]]).mean()) if is_copy.any() else float("nan")
        all_pairs, true_pairs = _pair_counts(labels, source)
        orig = ~is_copy
        merged = np.bincount(labels[orig], minlength=labels.max() + 1)[labels[orig]] > 1
        rows.append(
            {
                "threshold": float(t),
                "recall": recall,
                "pair_precision": true_pairs / all_pairs if all_pairs else 1.0,
                "false_pairs": all_pairs - true_pairs,
                "distinct_merged": int(merged.sum()),
                "n_components": int(labels.max() + 1),
            }
        )
    return pd.DataFrame(rows)


def choose_threshold(
    table: pd.DataFrame, min_recall: float = 0.95, min_precision: float = 0.99
) -> float | None:
    """Midpoint of the threshold interval meeting both targets (margin on both sides), None if empty."""
    ok = table[(table.recall >= min_recall) & (table.pair_precision >= min_precision)]
    if ok.empty:
        return None
    return float(round((ok.threshold.min() + ok.threshold.max()) / 2, 3))


def eval_match_rates(
    pool_emb: np.ndarray, eval_emb: np.ndarray, copy_of_eval: np.ndarray, thresholds: Sequence[float]
) -> pd.DataFrame:
    """Decontamination view: a pool item is flagged if its best eval match exceeds the threshold.

    ``copy_of_eval[i]`` is True when pool item i is a copy of some eval image. Reports recall of those and
    the false-flag rate of the other (distinct) pool items.
    """
    knn = knn_search(eval_emb, pool_emb, k=1)
    best = knn.sims[:, 0]
    rows = []
    for t in thresholds:
        flagged = best > np.float32(t)
        rows.append(
            {
                "threshold": float(t),
                "recall": float(flagged[copy_of_eval].mean()),
                "false_flag_rate": float(flagged[~copy_of_eval].mean()),
                "false_flags": int(flagged[~copy_of_eval].sum()),
            }
        )
    return pd.DataFrame(rows)


REUPLOAD = ("flip", "grey", "resize", "jpeg")  # web re-uploads without re-framing


def per_transform_recall(emb: np.ndarray, bench: CopyDetectionBench, threshold: float) -> pd.DataFrame:
    """Direct copy->source similarity above ``threshold``, split by transform kind (lower bound on the
    component recall, which can also link a copy through a chain)."""
    cp = np.where(bench.is_copy)[0]
    sims = (emb[cp] * emb[bench.source[cp]]).sum(axis=1)
    kinds = [bench.params[i]["transforms"] for i in cp]
    rows = []
    for t in TRANSFORMS:
        m = np.array([t in k.split("+") for k in kinds])
        if m.any():
            rows.append(
                {
                    "transform": t,
                    "n": int(m.sum()),
                    "recall": float((sims[m] > threshold).mean()),
                    "median_sim": float(np.median(sims[m])),
                }
            )
    return pd.DataFrame(rows)


def run_calibration(
    descriptor: Callable[[Sequence[Image.Image]], np.ndarray] | None = None,
    views_fn: Callable[[Sequence[Image.Image]], np.ndarray] | None = None,
    *,
    n_distinct: int = 5000,
    n_copies: int = 500,
    seeds: Sequence[int] = (0, 1, 2),
    thresholds: Sequence[float] = tuple(np.round(np.arange(0.950, 0.9995, 0.001), 4)),
    min_recall: float = 0.95,
    min_precision: float = 0.99,
    max_false_flag: float = 0.01,
) -> dict:
    """Full calibration on the real bench. Returns the figures quoted in ``embed.py``.

    * dedup threshold: mid-point of the interval where, on the re-upload bench and for every seed, recall
      >= ``min_recall`` and pair precision >= ``min_precision`` (precision-first fallback if empty);
    * at that threshold, benches whose copies may also be centre-cropped (zoom) or shifted-cropped are
      scored with the plain graph and with centre-crop views added (``views_fn``);
    * decontamination threshold: lowest threshold whose false-flag rate (distinct pool images matched to
      an eval image) stays <= ``max_false_flag`` for every seed -- leaking an eval image costs more than
      dropping a training image, as in the paper's lower 0.45 vs 0.6.
    """
    from .embed import copy_detection_descriptor, copy_detection_views

    descriptor = descriptor or copy_detection_descriptor
    views_fn = views_fn or copy_detection_views
    fashion, _ = load_fashion_mnist()
    benches_spec = {
        "reupload": REUPLOAD,
        "centre_crops": (*REUPLOAD, "centre_crop"),
        "shifted_crops": (*REUPLOAD, "crop"),
    }
    tables, decon, benches = [], [], {}
    for seed in seeds:
        for name, transforms in benches_spec.items():
            bench = build_copy_detection_bench(
                fashion, n_distinct=n_distinct, n_copies=n_copies, seed=seed, transforms=transforms
            )
            emb = descriptor(bench.images)
            benches[(name, seed)] = (bench, emb)
            if name != "reupload":
                continue
            table = evaluate_thresholds(emb, bench.source, bench.is_copy, thresholds)
            table.insert(0, "seed", seed)
            tables.append(table)
            # decontamination view: originals that were copied play the eval set
            ev = np.unique(bench.source[bench.is_copy])
            pool = np.setdiff1d(np.arange(len(bench)), ev)
            rates = eval_match_rates(
                emb[pool], emb[ev], bench.is_copy[pool], np.round(np.arange(0.80, 0.9995, 0.0025), 4)
            )
            rates.insert(0, "seed", seed)
            decon.append(rates)
    reup = pd.concat(tables, ignore_index=True)
    worst = (
        reup.groupby("threshold")
        .agg(
            recall=("recall", "min"),
            pair_precision=("pair_precision", "min"),
            false_pairs=("false_pairs", "max"),
        )
        .reset_index()
    )
    chosen = choose_threshold(worst, min_recall, min_precision)
    fallback = chosen is None
    if fallback:
        ok = worst[worst.pair_precision >= min_precision]
        chosen = float(ok.threshold.min()) if len(ok) else float(worst.threshold.max())
    feasible = worst[(worst.recall >= min_recall) & (worst.pair_precision >= min_precision)].threshold

    # every bench at the chosen threshold, without and with centre-crop views
    at_chosen = []
    for (name, seed), (bench, emb) in benches.items():
        views = views_fn(bench.images)
        for with_views in (False, True):
            row = evaluate_thresholds(
                emb, bench.source, bench.is_copy, [chosen], views=views if with_views else None
            ).iloc[0]
            at_chosen.append({"bench": name, "seed": seed, "views": with_views, **row.to_dict()})
    at_chosen = pd.DataFrame(at_chosen)
    summary = at_chosen.groupby(["bench", "views"]).agg(
        recall_min=("recall", "min"),
        recall_max=("recall", "max"),
        pair_precision_min=("pair_precision", "min"),
        false_pairs_max=("false_pairs", "max"),
    )

    d = pd.concat(decon, ignore_index=True)
    dworst = d.groupby("threshold").agg(recall=("recall", "min"), false_flag_rate=("false_flag_rate", "max"))
    ok = dworst[dworst.false_flag_rate <= max_false_flag]
    decon_t = float(ok.index.min()) if len(ok) else chosen
    bench0, emb0 = benches[("reupload", seeds[0])]
    crop_tolerance = {}
    for frac in (0.02, 0.05, 0.10):  # shifted-crop-only copies of the first seed's originals
        rng = np.random.default_rng(seeds[0])
        src = np.unique(bench0.source[bench0.is_copy])
        copies = [near_duplicate(bench0.images[i], rng, transforms=("crop",), max_crop=frac)[0] for i in src]
        sims = (descriptor(copies) * emb0[src]).sum(axis=1)
        crop_tolerance[f"max_crop_{frac:.2f}"] = float((sims > chosen).mean())
    at = worst.iloc[(worst.threshold - chosen).abs().argmin()]
    return {
        "bench": bench0.summary(),
        "seeds": list(seeds),
        "dedup_threshold": chosen,
        "dedup_threshold_fallback_precision_first": fallback,
        "reupload_worst_recall": float(at.recall),
        "reupload_worst_pair_precision": float(at.pair_precision),
        "reupload_max_false_pairs": int(at.false_pairs),
        "reupload_feasible_interval": None if fallback else [float(feasible.min()), float(feasible.max())],
        "at_threshold": {f"{b}{'+views' if v else ''}": r for (b, v), r in summary.round(4).iterrows()},
        "per_transform_recall": per_transform_recall(emb0, bench0, chosen).to_dict("records"),
        "shifted_crop_only_recall": crop_tolerance,
        "decontam_threshold": decon_t,
        "decontam_worst_recall": float(dworst.loc[decon_t, "recall"]),
        "decontam_worst_false_flag_rate": float(dworst.loc[decon_t, "false_flag_rate"]),
        "tables": {
            "reupload_worst": worst,
            "decontam_worst": dworst.reset_index(),
            "at_threshold": at_chosen,
        },
    }


if __name__ == "__main__":  # pragma: no cover - manual calibration entry point
    import json

    pd.set_option("display.width", 200)
    res = run_calibration()
    print(res["tables"]["reupload_worst"].to_string(index=False))
    print(res["tables"]["decontam_worst"].iloc[::4].to_string(index=False))
    print(res["tables"]["at_threshold"].to_string(index=False))
    res["at_threshold"] = {k: v.to_dict() for k, v in res["at_threshold"].items()}
    print(json.dumps({k: v for k, v in res.items() if k != "tables"}, indent=1, default=str))
