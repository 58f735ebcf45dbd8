"""The `ingest` stage: a raw crawl manifest in, a validated content-addressed image store out.

Every manifest row ends in exactly one of three tables, so counts always reconcile:
- `manifest.parquet`   one row per distinct image kept (sha256 of the fetched bytes is its identity);
- `duplicates.parquet` rows whose bytes equal an earlier row's (the first row in manifest order is kept);
- `quarantine.parquet` rows that could not be fetched or are not acceptable images, with a reason code.

Accepted images are decoded fully (not just the header), EXIF orientation applied, converted to RGB and stored
under `images/<sha[:2]>/<sha>.<ext>`: the original bytes when they already are a plain RGB/grey JPEG or PNG with
nothing to normalise, a lossless PNG of the normalised image otherwise. Names in the crawl never reach an
output path, so nothing is written outside `out`.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from tasks.log import get_logger, progress_kwargs
from tasks.params import IngestParams, Params, params_digest
from tasks.quality import TableCheck, validate_stage
from tasks.reports import write_metrics, write_parquet
from tasks.storage import (
    CredentialsError,
    Storage,
    StorageError,
    TooLargeError,
    atomic_write_bytes,
    scheme_of,
)

log = get_logger("ingest")

# The complete vocabulary of quarantine reasons; the GX suite rejects anything else.
REASONS = {
    "fetch_error": "could not fetch the source (missing file, network error, HTTP error)",
    "unsafe_path": "local path resolves outside the crawl's root folder",
    "empty": "zero bytes",
    "too_many_bytes": "file larger than ingest.max_bytes",
    "not_an_image": "bytes are not an image format Pillow recognises (HTML, text...)",
    "unsupported_format": "an image format not in ingest.allowed_formats",
    "decompression_bomb": "pixel count above ingest.max_pixels (checked before decoding)",
    "truncated": "image data ends early",
    "decode_error": "image data is corrupt",
    "too_small": "shorter side below ingest.min_side",
    "too_large": "longer side above ingest.max_side",
    "bad_aspect": "aspect ratio above ingest.max_aspect",
}

MANIFEST_COLUMNS = ["sha256", "row", "source", "bytes", "width", "height", "format", "mode", "path", "stored_format"]
DUPLICATE_COLUMNS = ["row", "source", "sha256", "duplicate_of_row", "duplicate_of_source"]
QUARANTINE_COLUMNS = ["row", "source", "reason", "message"]


@dataclass
class Outcome:
    """What happened to one manifest row (exactly one of accepted / quarantined)."""

    row: int
    source: str
    sha256: str = ""
    bytes: int = 0
    width: int = 0
    height: int = 0
    format: str = ""
    mode: str = ""
    stored_format: str = ""
    reason: str = ""
    message: str = ""


class Rejected(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class IngestResult:
    manifest: pd.DataFrame
    duplicates: pd.DataFrame
    quarantine: pd.DataFrame
    metrics: dict


# --------------------------------------------------------------------------------------------- decoding
def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: alpha composited on white, 16-bit/float scaled, CMYK/palette converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(np.round(arr / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_and_normalise(data: bytes, p: IngestParams) -> tuple[Image.Image, dict, bytes | None]:
    """Verify `data` is an acceptable image; return (RGB image, facts, bytes to store or None to re-encode).

    Raises Rejected with a reason code from REASONS.
    """
    if len(data) == 0:
        raise Rejected("empty", "zero bytes")
    with warnings.catch_warnings():
        # Our own max_pixels check below decides; Pillow's warning tier would only duplicate it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise Rejected("decompression_bomb", f"refused by Pillow before decoding: {exc}") from None
        except UnidentifiedImageError:
            raise Rejected("not_an_image", "not a recognised image format") from None
        except Exception as exc:
            raise Rejected("decode_error", f"{type(exc).__name__}: {exc}") from None
        fmt = img.format or ""
        if fmt not in p.allowed_formats:
            raise Rejected("unsupported_format", f"format {fmt or 'unknown'} not in {p.allowed_formats}")
        w, h = img.size
        if w * h > p.max_pixels:
            raise Rejected("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {p.max_pixels}")
        try:
            img.load()
        except OSError as exc:
            text = str(exc)
            reason = "truncated" if "truncated" in text or "end of file" in text.lower() else "decode_error"
            raise Rejected(reason, f"{type(exc).__name__}: {text}") from None
        except Exception as exc:  # SyntaxError, ValueError, zlib.error... from corrupt streams
            raise Rejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    mode = img.mode
    orientation = img.getexif().get(0x0112, 1)
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
    w, h = img.size
    if min(w, h) < p.min_side:
        raise Rejected("too_small", f"{w}x{h}: shorter side < min_side {p.min_side}")
    if max(w, h) > p.max_side:
        raise Rejected("too_large", f"{w}x{h}: longer side > max_side {p.max_side}")
    if max(w, h) / min(w, h) > p.max_aspect:
        raise Rejected("bad_aspect", f"{w}x{h}: aspect {max(w, h) / min(w, h):.1f} > max_aspect {p.max_aspect}")
    passthrough = fmt in ("JPEG", "PNG") and mode in ("RGB", "L") and orientation in (1, None)
    rgb = img if passthrough else _to_rgb(img)
    facts = {"width": w, "height": h, "format": fmt, "mode": mode}
    return rgb, facts, (data if passthrough else None)


def stored_relpath(sha: str, fmt: str) -> str:
    ext = "jpg" if fmt == "JPEG" else "png"
    return f"images/{sha[:2]}/{sha}.{ext}"


# --------------------------------------------------------------------------------------------- fetching
def resolve_source(url: str, root: Path, allow_outside_root: bool) -> str:
    """Local paths are relative to the manifest's folder and, unless allowed, must stay inside it."""
    scheme = scheme_of(url)
    if scheme not in ("local", "file"):
        return url
    raw = url[len("file://"):] if scheme == "file" else url
    path = Path(raw)
    full = (path if path.is_absolute() else root / path).resolve()
    if not allow_outside_root and not full.is_relative_to(root.resolve()):
        raise Rejected("unsafe_path", f"{url!r} resolves outside the crawl root {root}")
    return str(full)


class _Ingestor:
    def __init__(self, p: IngestParams, storage: Storage, root: Path, out: Path):
        self.p, self.storage, self.root, self.out = p, storage, root, out

    def process(self, row: int, url: str) -> Outcome:
        try:
            if not isinstance(url, str) or not url.strip():
                raise Rejected("fetch_error", "empty url")
            target = resolve_source(url.strip(), self.root, self.p.allow_outside_root)
            try:
                data = self.storage.read_bytes_with_retries(
                    target, self.p.max_bytes, self.p.http_retries, self.p.retry_backoff_s
                )
            except TooLargeError as exc:
                raise Rejected("too_many_bytes", str(exc)) from None
            except CredentialsError:
                raise  # fatal for the stage: every s3 row would fail the same way
            except StorageError as exc:
                raise Rejected("fetch_error", str(exc).replace(target, url)) from None
            sha = hashlib.sha256(data).hexdigest()
            rgb, facts, passthrough = decode_and_normalise(data, self.p)
            stored_fmt = "JPEG" if passthrough is not None and facts["format"] == "JPEG" else "PNG"
            dest = self.out / stored_relpath(sha, stored_fmt)
            if not dest.exists():
                if passthrough is not None:
                    payload = passthrough
                else:
                    buf = io.BytesIO()
                    rgb.save(buf, "PNG")
                    payload = buf.getvalue()
                atomic_write_bytes(dest, payload)
            return Outcome(row, url, sha256=sha, bytes=len(data), stored_format=stored_fmt, **facts)
        except Rejected as rej:
            return Outcome(row, str(url), reason=rej.reason, message=rej.message[:300])


def read_crawl_manifest(path: str | Path, url_column: str) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"crawl manifest {path} not found (set ingest.manifest)")
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, dtype=str, keep_default_na=False)
    if url_column not in frame.columns:
        raise ValueError(f"crawl manifest {path}: no '{url_column}' column (columns: {list(frame.columns)})")
    return frame


def run_ingest(params: Params) -> IngestResult:
    """Fetch, verify, normalise and store every crawl row; write the three tables and the metrics."""
    p = params.ingest
    out = Path(p.out)
    crawl = read_crawl_manifest(p.manifest, p.url_column)
    urls = crawl[p.url_column].tolist()
    storage = Storage.from_params(params.storage, http_timeout_s=p.http_timeout_s)
    ingestor = _Ingestor(p, storage, Path(p.manifest).parent, out)
    # Outputs are rebuilt from scratch so a rerun is byte-identical and nothing stale survives.
    for name in ("manifest.parquet", "duplicates.parquet", "quarantine.parquet"):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    outcomes: list[Outcome] = [None] * len(urls)  # type: ignore[list-item]
    with ThreadPoolExecutor(max_workers=p.workers) as pool:
        futures = pool.map(lambda item: ingestor.process(*item), enumerate(urls))
        for outcome in tqdm(futures, total=len(urls), desc="ingest", unit="img", **progress_kwargs()):
            outcomes[outcome.row] = outcome
    elapsed = time.perf_counter() - start

    kept, dups, quarantined = [], [], []
    first_row: dict[str, Outcome] = {}
    for o in outcomes:  # manifest order decides which of several identical files is kept
        if o.reason:
            quarantined.append({"row": o.row, "source": o.source, "reason": o.reason, "message": o.message})
        elif o.sha256 in first_row:
            f = first_row[o.sha256]
            dups.append({"row": o.row, "source": o.source, "sha256": o.sha256,
                         "duplicate_of_row": f.row, "duplicate_of_source": f.source})
        else:
            first_row[o.sha256] = o
            kept.append({"sha256": o.sha256, "row": o.row, "source": o.source, "bytes": o.bytes,
                         "width": o.width, "height": o.height, "format": o.format, "mode": o.mode,
                         "path": stored_relpath(o.sha256, o.stored_format), "stored_format": o.stored_format})
    manifest = pd.DataFrame(kept, columns=MANIFEST_COLUMNS)
    duplicates = pd.DataFrame(dups, columns=DUPLICATE_COLUMNS)
    quarantine = pd.DataFrame(quarantined, columns=QUARANTINE_COLUMNS)
    _remove_unreferenced(out, set(manifest["path"]))

    validate_stage("ingest", ingest_checks(manifest, duplicates, quarantine, len(urls), p, out), params.reports)
    write_parquet(out / "manifest.parquet", manifest)
    write_parquet(out / "duplicates.parquet", duplicates)
    write_parquet(out / "quarantine.parquet", quarantine)

    by_reason = quarantine["reason"].value_counts().sort_index().to_dict()
    by_scheme = pd.Series([scheme_of(u) for u in urls]).value_counts().sort_index().to_dict() if urls else {}
    metrics = {
        "input_rows": len(urls),
        "kept": len(manifest),
        "exact_duplicates": len(duplicates),
        "quarantined": len(quarantine),
        "reconciles": len(urls) == len(manifest) + len(duplicates) + len(quarantine),
        "quarantine_by_reason": {k: int(v) for k, v in by_reason.items()},
        "input_by_scheme": {k: int(v) for k, v in by_scheme.items()},
        "stored_bytes": int(sum(f.stat().st_size for f in (out / "images").rglob("*") if f.is_file()))
        if (out / "images").exists() else 0,
        "seconds": round(elapsed, 3),
        "images_per_second": round(len(urls) / elapsed, 1) if elapsed > 0 else None,
        "workers": p.workers,
        "params": params_digest(p),
    }
    write_metrics(params.reports, "ingest", metrics)
    log.info("ingest: %d rows -> %d kept, %d exact duplicates, %d quarantined %s (%.0f img/s)",
             len(urls), len(manifest), len(duplicates), len(quarantine), metrics["quarantine_by_reason"],
             metrics["images_per_second"] or 0)
    return IngestResult(manifest, duplicates, quarantine, metrics)


def ingest_checks(manifest: pd.DataFrame, duplicates: pd.DataFrame, quarantine: pd.DataFrame, n_input: int,
                  p: IngestParams, out: Path) -> list[TableCheck]:
    """The ingest boundary: identities well-formed and unique, sizes in limits, known reasons, counts reconcile."""
    import great_expectations.expectations as gxe

    outcomes = pd.DataFrame({"row": pd.concat([manifest["row"], duplicates["row"], quarantine["row"]],
                                              ignore_index=True).astype("int64")})
    stored = pd.DataFrame({"path": manifest["path"],
                           "exists": [(out / rel).is_file() for rel in manifest["path"]]})
    return [
        TableCheck("manifest", manifest, [
            gxe.ExpectColumnValuesToBeUnique(column="sha256"),
            gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"),
            gxe.ExpectColumnValuesToNotBeNull(column="source"),
            gxe.ExpectColumnValuesToBeBetween(column="width", min_value=p.min_side, max_value=p.max_side),
            gxe.ExpectColumnValuesToBeBetween(column="height", min_value=p.min_side, max_value=p.max_side),
            gxe.ExpectColumnValuesToBeBetween(column="bytes", min_value=1, max_value=p.max_bytes),
            gxe.ExpectColumnValuesToMatchRegex(column="path", regex=r"^images/[0-9a-f]{2}/[0-9a-f]{64}\.(?:jpg|png)$"),
        ]),
        TableCheck("duplicates", duplicates, [
            gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"),
            gxe.ExpectColumnValuesToBeInSet(column="sha256", value_set=sorted(set(manifest["sha256"]))),
        ]),
        TableCheck("quarantine", quarantine, [
            gxe.ExpectColumnValuesToBeInSet(column="reason", value_set=sorted(REASONS)),
            gxe.ExpectColumnValuesToNotBeNull(column="message"),
        ]),
        TableCheck("outcomes", outcomes, [  # in = kept + exact duplicates + quarantined, each row exactly once
            gxe.ExpectTableRowCountToEqual(value=n_input),
            gxe.ExpectColumnValuesToBeUnique(column="row"),
            gxe.ExpectColumnValuesToBeBetween(column="row", min_value=0, max_value=max(0, n_input - 1)),
        ]),
        TableCheck("stored_files", stored, [
            gxe.ExpectColumnValuesToBeInSet(column="exists", value_set=[True]),
        ]),
    ]


def _remove_unreferenced(out: Path, keep: set[str]) -> None:
    """A rerun over a changed crawl must not leave images that no manifest row points at."""
    images = out / "images"
    if not images.exists():
        return
    for f in sorted(images.rglob("*")):
        if f.is_file() and f.relative_to(out).as_posix() not in keep:
            f.unlink()
