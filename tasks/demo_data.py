"""The `demo-data` stage: a small, real, offline stand-in for a web crawl plus the evaluation sets.

Everything is materialised deterministically from `demo_data.seed` out of images that ship on this machine:
- in-domain: real Fashion-MNIST product photos (Debian `dataset-fashion-mnist`, MIT);
- off-domain: crops of natural photos shipped inside scikit-image, scikit-learn and matplotlib, and rendered
  text/page images (synthetic: no package ships page scans at this scale);
- near-domain distractors (off-domain for the ground truth): handwritten digits and grey 28 px photo thumbnails in
  Fashion-MNIST's own format;
- planted exact and near-duplicates, planted copies of evaluation test images and a corpus of broken files, so
  that every curation stage's quality is measured against a ground-truth sidecar instead of assumed.

The sidecar (`ground_truth.parquet`) is for metrics and tests only; stages never read it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont, ImageOps

from tasks.log import get_logger
from tasks.params import Params, params_record
from tasks.reports import write_metrics, write_parquet
from tasks.stages import DemoDataParams

log = get_logger("demo_data")

FASHION_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]

# What ingest is expected to do with each planted broken file (the ground truth tests and metrics check).
BROKEN_KINDS: dict[str, tuple[str, str]] = {
    # kind: (expected outcome, expected quarantine reason or "")
    "zero_bytes": ("quarantined", "empty"),
    "truncated_jpeg": ("quarantined", "truncated"),
    "html_as_jpg": ("quarantined", "not_an_image"),
    "text_file": ("quarantined", "not_an_image"),
    "corrupt_png": ("quarantined", "decode_error"),
    "decompression_bomb": ("quarantined", "decompression_bomb"),
    "tiny_5x5": ("quarantined", "too_small"),
    "banner_aspect": ("quarantined", "bad_aspect"),
    "path_traversal": ("quarantined", "unsafe_path"),
    "missing_file": ("quarantined", "fetch_error"),
    "cmyk_jpeg": ("kept", ""),
    "png_16bit": ("kept", ""),
    "palette_gif_transparency": ("kept", ""),
    "exif_rotated_jpeg": ("kept", ""),
    "dotdot_in_name": ("kept", ""),
}


class DemoDataError(RuntimeError):
    """The offline sources are missing; the message says which package provides them."""


# ---------------------------------------------------------------------------------------------- sources
def load_fashion_mnist(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels int64 [N]) from the gzip IDX files of Debian's package."""
    folder = Path(folder)
    prefix = "train" if split == "train" else "t10k"
    img_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    lbl_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists() or not lbl_path.exists():
        raise DemoDataError(
            f"Fashion-MNIST not found in {folder}: install it with `apt-get install dataset-fashion-mnist` "
            "(or `make setup`), or set demo_data.fashion_mnist_dir"
        )
    with gzip.open(img_path, "rb") as fh:
        magic, n, rows, cols = struct.unpack(">IIII", fh.read(16))
        images = np.frombuffer(fh.read(), dtype=np.uint8).reshape(n, rows, cols)
    with gzip.open(lbl_path, "rb") as fh:
        magic, n_labels = struct.unpack(">II", fh.read(8))
        labels = np.frombuffer(fh.read(), dtype=np.uint8).astype(np.int64)
    if magic != 2049 or n_labels != n:
        raise DemoDataError(f"{lbl_path}: not a Fashion-MNIST label file")
    return images, labels


def natural_photos() -> list[tuple[str, np.ndarray]]:
    """Real photographs that ship inside Python packages (RGB uint8), sorted by name for determinism."""
    import matplotlib.cbook
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    photos: list[tuple[str, np.ndarray]] = []
    for name in ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "camera", "moon", "coins", "clock", "brick", "grass", "gravel"]:
        arr = getattr(sk, name)()
        photos.append((f"skimage.{name}", _to_rgb(arr)))
    photos.append(("skimage.stereo_motorcycle", _to_rgb(sk.stereo_motorcycle()[0])))
    for i, arr in enumerate(load_sample_images().images):
        photos.append((f"sklearn.sample_{i}", _to_rgb(arr)))
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        photos.append(("matplotlib.grace_hopper", np.asarray(Image.open(fh).convert("RGB"))))
    return sorted(photos, key=lambda p: p[0])


def _to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


TEXTURES = ("skimage.brick", "skimage.grass", "skimage.gravel", "skimage.coffee", "skimage.astronaut",
            "skimage.rocket", "skimage.chelsea", "sklearn.sample_0", "sklearn.sample_1")


# ---------------------------------------------------------------------------------------------- encoders
def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def near_duplicate(img: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, str, int]:
    """One or two of: resize, slight crop, horizontal flip; then re-encode (returned JPEG quality)."""
    ops = rng.choice(["resize", "crop", "flip", "jpeg"], size=int(rng.integers(1, 3)), replace=False)
    out = img
    for op in ops:
        w, h = out.size
        if op == "resize":
            f = float(rng.uniform(0.8, 2.5))
            out = out.resize((max(20, round(w * f)), max(20, round(h * f))), Image.Resampling.BICUBIC)
        elif op == "crop":
            fx, fy = rng.uniform(0.02, 0.08, size=2)
            dx, dy = max(1, round(w * fx)), max(1, round(h * fy))
            out = out.crop((dx, dy, w - dx, h - dy))
        elif op == "flip":
            out = ImageOps.mirror(out)
    quality = int(rng.integers(30, 96)) if "jpeg" in ops else 0
    return out, "+".join(sorted(str(o) for o in ops)), quality


def decompression_bomb_png(side: int = 30000) -> bytes:
    """A valid 1-bit PNG of side x side pixels that is ~100 KB on disk: built row by row, never in memory."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(comp.compress(row * (side % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------- builder
def _digit_images() -> np.ndarray:
    """scikit-learn's 1,797 handwritten digits (8x8, 0-16) as uint8 images."""
    from sklearn.datasets import load_digits

    return (load_digits().images * (255 / 16)).clip(0, 255).astype(np.uint8)


@dataclass
class CrawlRow:
    url: str
    kind: str  # in_domain | off_domain_photo | off_domain_text | near_domain | exact_duplicate | near_duplicate |
    #           eval_copy | broken
    label: int = -1
    original: str = ""  # for duplicates: the url of the original; for eval copies: the eval image id
    transform: str = ""
    broken_kind: str = ""
    expected_outcome: str = "kept"
    expected_reason: str = ""


class _Crawl:
    """Accumulates files under crawl/files and the rows that point at them."""

    def __init__(self, root: Path):
        self.root = root
        self.files = root / "files"
        self.files.mkdir(parents=True, exist_ok=True)
        self.rows: list[CrawlRow] = []
        self._n = 0

    def add(self, data: bytes, ext: str, row: CrawlRow, name: str | None = None) -> CrawlRow:
        if name is None:
            name = f"img_{self._n:06d}.{ext}"
            self._n += 1
        (self.files / name).write_bytes(data)
        row.url = f"files/{name}"
        self.rows.append(row)
        return row


def _text_image(rng: np.random.Generator, vocab: list[str]) -> Image.Image:
    w, h = int(rng.integers(120, 300)), int(rng.integers(90, 220))
    bg = tuple(int(v) for v in rng.integers(215, 256, size=3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    size = int(rng.integers(9, 17))
    font = ImageFont.load_default(size=size)
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    y = int(rng.integers(2, 10))
    while y < h - size:
        words = " ".join(rng.choice(vocab, size=int(rng.integers(2, 8))))
        draw.text((int(rng.integers(2, 12)), y), words, fill=ink, font=font)
        y += size + int(rng.integers(2, 8))
    return img


_VOCAB = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "it", "an", "be", "this", "which", "or", "are", "have", "not", "has", "image", "model", "data",
    "curated", "crawl", "pipeline", "vision", "transformer", "patch", "token", "loss", "teacher",
    "student", "distillation", "retrieval", "cluster", "index", "shard", "dataset", "page", "chapter",
    "figure", "table", "results", "section"]


def _segmentation_sample(item: np.ndarray, label: int, background: np.ndarray, size: int,
                         rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """A Fashion-MNIST item pasted on a real photo/texture crop; the mask is exact (label+1 on the item)."""
    bh, bw = background.shape[:2]
    cs = int(rng.integers(size, min(bh, bw) // 2))
    y0, x0 = int(rng.integers(0, bh - cs)), int(rng.integers(0, bw - cs))
    canvas = Image.fromarray(background[y0:y0 + cs, x0:x0 + cs]).resize((size, size), Image.Resampling.BILINEAR)
    side = int(rng.integers(int(size * 0.7), size + 1))  # large items: ~1/3 of the pixels are foreground
    obj = Image.fromarray(item).resize((side, side), Image.Resampling.NEAREST)
    obj_arr = np.asarray(obj)
    fg = obj_arr > 40
    tint = rng.uniform(0.6, 1.0, size=3)
    colour = (obj_arr[..., None] * tint[None, None, :]).clip(0, 255).astype(np.uint8)
    px, py = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
    img = np.asarray(canvas).copy()
    region = img[py:py + side, px:px + side]
    region[fg] = colour[fg]
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[py:py + side, px:px + side][fg] = label + 1
    return Image.fromarray(img), Image.fromarray(mask, mode="L")


def build_demo_data(p: DemoDataParams) -> dict:
    """Materialise crawl, seed set, eval sets and the ground-truth sidecar under `p.out`. Returns counts."""
    out = Path(p.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rng = np.random.default_rng(p.seed)

    train_x, train_y = load_fashion_mnist(p.fashion_mnist_dir, "train")
    test_x, test_y = load_fashion_mnist(p.fashion_mnist_dir, "test")
    need_train = p.n_in_domain + p.n_seed + p.n_eval_train + p.n_seg_train
    need_test = p.n_eval_test + p.n_seg_test
    if need_train > len(train_x) or need_test > len(test_x):
        raise DemoDataError(f"demo_data sizes need {need_train} train / {need_test} test Fashion-MNIST items; "
                            f"the dataset has {len(train_x)} / {len(test_x)}")
    perm = rng.permutation(len(train_x))
    cuts = np.cumsum([p.n_in_domain, p.n_seed, p.n_eval_train, p.n_seg_train])
    crawl_idx, seed_idx, evtrain_idx, segtrain_idx = np.split(perm[: cuts[-1]], cuts[:-1])
    tperm = rng.permutation(len(test_x))
    evtest_idx, segtest_idx = tperm[: p.n_eval_test], tperm[p.n_eval_test: need_test]

    # -- evaluation sets (classification) ------------------------------------------------------------------
    eval_dir = out / "eval" / "classification"
    eval_png: dict[str, bytes] = {}
    for split, idx, xs, ys in (("train", evtrain_idx, train_x, train_y), ("test", evtest_idx, test_x, test_y)):
        rows = []
        for i in idx:
            eid = f"fmnist-{split}-{int(i):05d}"
            data = encode(Image.fromarray(xs[i], mode="L"), "PNG")
            path = eval_dir / split / f"{eid}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            if split == "test":
                eval_png[eid] = data
            rows.append({"id": eid, "path": f"{split}/{eid}.png", "label": int(ys[i])})
        pd.DataFrame(rows).to_csv(eval_dir / f"{split}.csv", index=False)

    # -- seed set -----------------------------------------------------------------------------------------
    seed_dir = out / "seed"
    rows = []
    for i in seed_idx:
        sid = f"seed-{int(i):05d}"
        path = seed_dir / "images" / f"{sid}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(Image.fromarray(train_x[i], mode="L"), "PNG"))
        rows.append({"id": sid, "path": f"images/{sid}.png", "label": int(train_y[i])})
    pd.DataFrame(rows).to_csv(seed_dir / "seed.csv", index=False)

    # -- segmentation set ---------------------------------------------------------------------------------
    photos = dict(natural_photos())
    textures = [photos[name] for name in TEXTURES]
    seg_dir = out / "eval" / "segmentation"
    for split, idx, xs, ys in (("train", segtrain_idx, train_x, train_y), ("test", segtest_idx, test_x, test_y)):
        rows = []
        for j, i in enumerate(idx):
            bg = textures[int(rng.integers(len(textures)))]
            img, mask = _segmentation_sample(xs[i], int(ys[i]), bg, p.seg_size, rng)
            sid = f"seg-{split}-{j:05d}"
            (seg_dir / split / "images").mkdir(parents=True, exist_ok=True)
            (seg_dir / split / "masks").mkdir(parents=True, exist_ok=True)
            img.save(seg_dir / split / "images" / f"{sid}.png")
            mask.save(seg_dir / split / "masks" / f"{sid}.png")
            rows.append({"id": sid, "image": f"{split}/images/{sid}.png", "mask": f"{split}/masks/{sid}.png"})
        pd.DataFrame(rows).to_csv(seg_dir / f"{split}.csv", index=False)
    (seg_dir / "classes.txt").write_text("\n".join(["background", *FASHION_CLASSES]) + "\n")

    # -- the raw crawl ------------------------------------------------------------------------------------
    crawl = _Crawl(out / "crawl")
    originals: list[tuple[CrawlRow, Image.Image, bytes]] = []
    for i in crawl_idx:
        img = Image.fromarray(train_x[i], mode="L")
        fmt = "JPEG" if rng.random() < p.jpeg_fraction else "PNG"
        data = encode(img, fmt, quality=int(rng.integers(85, 96)))
        row = crawl.add(data, "jpg" if fmt == "JPEG" else "png", CrawlRow("", "in_domain", label=int(train_y[i])))
        originals.append((row, img, data))

    photo_list = sorted(photos.items())
    per_photo = int(np.ceil(p.n_off_domain_photos / max(1, len(photo_list))))
    grid = int(np.ceil(np.sqrt(per_photo)))
    n_photo = 0
    for name, arr in photo_list:
        h, w = arr.shape[:2]
        cells = [(r, c) for r in range(grid) for c in range(grid)]
        for r, c in cells[:per_photo]:
            if n_photo >= p.n_off_domain_photos:
                break
            ch, cw = h // grid, w // grid
            y0 = r * ch + int(rng.integers(0, max(1, ch // 8)))
            x0 = c * cw + int(rng.integers(0, max(1, cw // 8)))
            crop = Image.fromarray(arr[y0:y0 + ch - ch // 8, x0:x0 + cw - cw // 8])
            target = int(rng.integers(48, 161))
            scale = target / max(crop.size)
            crop = crop.resize((max(20, round(crop.size[0] * scale)), max(20, round(crop.size[1] * scale))),
                               Image.Resampling.BICUBIC)
            data = encode(crop, "JPEG", quality=int(rng.integers(80, 96)))
            row = crawl.add(data, "jpg", CrawlRow("", "off_domain_photo", original=name))
            originals.append((row, crop, data))
            n_photo += 1

    # near-domain distractors: Fashion-MNIST's own format (28 px grey, a bright object on black) without its
    # content, which low-level descriptors cannot tell from the in-domain items: handwritten digits (scikit-learn's
    # 8x8 scans, upscaled the way MNIST is framed) and grey 28 px thumbnails of the natural photos
    digits = _digit_images() if p.n_near_domain else None
    for k in range(p.n_near_domain):
        if k % 2 == 0:
            arr = digits[int(rng.integers(len(digits)))]
            img = Image.fromarray(arr, mode="L").resize((20, 20), Image.Resampling.BICUBIC)
            img = ImageOps.expand(img, border=4, fill=0).rotate(float(rng.uniform(-12, 12)))
            source = "digit"
        else:
            name, arr = photo_list[int(rng.integers(len(photo_list)))]
            h, w = arr.shape[:2]
            side = int(min(h, w) * rng.uniform(0.2, 0.5))
            y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            img = ImageOps.grayscale(Image.fromarray(arr[y0:y0 + side, x0:x0 + side])).resize(
                (28, 28), Image.Resampling.BICUBIC)
            source = name
        data = encode(img, "PNG")
        row = crawl.add(data, "png", CrawlRow("", "near_domain", original=source))
        originals.append((row, img, data))

    for _ in range(p.n_off_domain_text):
        img = _text_image(rng, _VOCAB)
        data = encode(img, "PNG")
        row = crawl.add(data, "png", CrawlRow("", "off_domain_text"))
        originals.append((row, img, data))

    picks = rng.choice(len(originals), size=p.n_exact_duplicates, replace=True)
    for k, j in enumerate(picks):
        src_row, _, data = originals[int(j)]
        ext = src_row.url.rsplit(".", 1)[-1]
        dup = CrawlRow("", "exact_duplicate", label=src_row.label, original=src_row.url)
        if k % 10 == 0:  # the same URL crawled twice, not only the same bytes at two URLs
            dup.url = src_row.url
            crawl.rows.append(dup)
        else:
            crawl.add(data, ext, dup)

    picks = rng.choice(len(originals), size=p.n_near_duplicates, replace=False)
    for j in picks:
        src_row, img, _ = originals[int(j)]
        dup_img, how, quality = near_duplicate(img, rng)
        fmt = "JPEG" if quality else "PNG"
        data = encode(dup_img, fmt, quality=quality or 90)
        crawl.add(data, "jpg" if quality else "png",
                  CrawlRow("", "near_duplicate", label=src_row.label, original=src_row.url, transform=how))

    eval_ids = sorted(eval_png)
    picks = rng.choice(len(eval_ids), size=min(p.n_eval_copies, len(eval_ids)), replace=False)
    for k, j in enumerate(picks):
        eid = eval_ids[int(j)]
        label = int(test_y[int(eid.rsplit("-", 1)[1])])
        if k % 3 == 0:
            crawl.add(eval_png[eid], "png", CrawlRow("", "eval_copy", label=label, original=eid, transform="exact"))
        else:
            dup_img, how, quality = near_duplicate(Image.open(io.BytesIO(eval_png[eid])), rng)
            data = encode(dup_img, "JPEG" if quality else "PNG", quality=quality or 90)
            crawl.add(data, "jpg" if quality else "png",
                      CrawlRow("", "eval_copy", label=label, original=eid, transform=how))

    _add_broken_corpus(crawl, photos, rng)

    for k in range(p.dead_http_urls):  # port 9 (discard) on loopback is closed: connection refused at once
        crawl.rows.append(CrawlRow(f"http://127.0.0.1:9/crawl/unreachable-{k}.jpg", "broken",
                                   broken_kind="dead_http_url", expected_outcome="quarantined",
                                   expected_reason="fetch_transient"))

    # Shuffle so that duplicates never sit next to their originals; exact duplicates of the same bytes are
    # then resolved by ingest in manifest order, which the ground truth below mirrors.
    order = rng.permutation(len(crawl.rows))
    rows = [crawl.rows[int(i)] for i in order]
    manifest = pd.DataFrame({"url": [r.url for r in rows]})
    manifest.to_csv(out / "crawl" / "manifest.csv", index=False)
    gt = pd.DataFrame([r.__dict__ for r in rows])
    gt.insert(0, "row", np.arange(len(gt)))
    gt["sha256"] = [_sha_of(out / "crawl" / r.url) for r in rows]
    # Identical bytes: ingest keeps the first row in manifest order and records the others as exact duplicates.
    decodable = gt["expected_outcome"] == "kept"
    first = gt[decodable].groupby("sha256")["row"].transform("min")
    gt.loc[decodable & (gt["row"] != first.reindex(gt.index)), "expected_outcome"] = "exact_duplicate"
    write_parquet(out / "ground_truth.parquet", gt)

    counts = gt["kind"].value_counts().sort_index().to_dict()
    summary = {
        "crawl_rows": len(gt),
        "by_kind": {k: int(v) for k, v in counts.items()},
        "seed": len(seed_idx),
        "eval_train": len(evtrain_idx),
        "eval_test": len(evtest_idx),
        "seg_train": len(segtrain_idx),
        "seg_test": len(segtest_idx),
    }
    log.info("demo data: %d crawl rows %s", summary["crawl_rows"], summary["by_kind"])
    return summary


def _sha_of(path: Path) -> str:
    if "://" in str(path) or not path.is_file() or not path.resolve().is_relative_to(path.parent.resolve()):
        return ""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rendered(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A unique synthetic picture (random coloured ellipses and boxes): a stand-in that copies nothing."""
    from PIL import ImageDraw

    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        box = (x0, y0, x0 + int(rng.integers(8, w // 2)), y0 + int(rng.integers(8, h // 2)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def _add_broken_corpus(crawl: _Crawl, photos: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """One file per way a crawl goes wrong; decodable oddities (CMYK, 16-bit...) must be kept, the rest quarantined."""
    photo = Image.fromarray(photos["skimage.chelsea"]).resize((150, 100))

    def add(kind: str, data: bytes, ext: str, name: str | None = None, label: int = -1) -> CrawlRow:
        outcome, reason = BROKEN_KINDS[kind]
        return crawl.add(data, ext, CrawlRow("", "broken", label=label, broken_kind=kind,
                                             expected_outcome=outcome, expected_reason=reason), name=name)

    add("zero_bytes", b"", "jpg")
    jpeg = encode(photo, "JPEG", quality=90)
    add("truncated_jpeg", jpeg[: len(jpeg) // 2], "jpg")
    add("html_as_jpg", b"<!DOCTYPE html><html><head><title>404 Not Found</title></head>"
                       b"<body><h1>Not Found</h1></body></html>\n", "jpg")
    add("text_file", b"this is a plain text file that a crawler saved with an image extension\n" * 4, "png")
    png = bytearray(encode(Image.fromarray(photos["skimage.astronaut"]).resize((96, 96)), "PNG"))
    idat = png.find(b"IDAT")
    for k in range(idat + 40, min(len(png) - 20, idat + 400), 7):  # scramble the compressed stream
        png[k] ^= 0x5A
    add("corrupt_png", bytes(png), "png")
    add("decompression_bomb", decompression_bomb_png(30000), "png")
    add("tiny_5x5", encode(Image.new("RGB", (5, 5), (200, 30, 30)), "PNG"), "png")
    add("banner_aspect", encode(Image.fromarray(photos["skimage.rocket"]).resize((640, 40)), "JPEG"), "jpg")
    add("cmyk_jpeg", encode(photo.convert("CMYK"), "JPEG", quality=90), "jpg")
    ramp = (np.linspace(0, 65535, 64 * 48, dtype=np.float64).reshape(48, 64)).astype(np.uint16)
    add("png_16bit", encode(Image.fromarray(ramp), "PNG"), "png")
    # The decodable oddities are distinct images: made from one photo they would be true copies of each other that
    # the ground truth calls distinct (a copy detector that finds them would be scored wrong).
    art = np.random.default_rng(20261201)  # its own stream: the crawl's shuffle (from `rng`) stays as it was
    pal = _rendered(art, (150, 100)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    buf = io.BytesIO()
    pal.save(buf, "GIF", transparency=0)
    add("palette_gif_transparency", buf.getvalue(), "gif")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    _rendered(art, (150, 100)).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    add("exif_rotated_jpeg", buf.getvalue(), "jpg")
    add("dotdot_in_name", encode(Image.fromarray(photos["skimage.coffee"]).resize((90, 60)), "PNG"), "png",
        name="..weird..name...png")
    outcome, reason = BROKEN_KINDS["path_traversal"]
    crawl.rows.append(CrawlRow("files/../../../../etc/hostname", "broken", broken_kind="path_traversal",
                               expected_outcome=outcome, expected_reason=reason))
    outcome, reason = BROKEN_KINDS["missing_file"]
    crawl.rows.append(CrawlRow("files/does-not-exist.jpg", "broken", broken_kind="missing_file",
                               expected_outcome=outcome, expected_reason=reason))


def run_demo_data(params: Params) -> dict:
    """Stage entry point: build the data and record what was built in `reports/metrics/demo-data.json`."""
    summary = build_demo_data(params.demo_data)
    write_metrics(params.reports, "demo-data", {**summary, "params": params_record(params.demo_data)})
    return summary
