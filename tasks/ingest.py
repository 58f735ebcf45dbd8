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
import shutil
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
from tasks.params import Params, params_record
from tasks.reports import write_metrics, write_parquet
from tasks.sources import Source, SourceRejected, parse_source, shown_cell
from tasks.stages import IngestParams
from tasks.storage import (
    CredentialsError,
    Storage,
    StorageError,
    TooLargeError,
    atomic_write_bytes,
    scheme_of,
)
from tasks.tables import read_user_table
from tasks.validation import TableCheck, validate_stage

log = get_logger("ingest")

# The complete vocabulary of quarantine reasons; the GX suite rejects anything else.
REASONS = {
    "empty_url": "the url cell is empty",
    "bad_url": "malformed url (no host, bad port, control characters, file:// naming a host, too long...)",
    "unsupported_scheme": "a scheme that is never fetched (only local paths, file://, http(s):// and s3://)",
    "unsafe_path": "local path resolves outside the crawl's root folder",
    "fetch_error": "the source cannot be fetched (missing file, HTTP 404/403, unknown host, ...)",
    "fetch_transient": "network/S3 fault that outlasted the retries (timeout, refused, HTTP 429/5xx, throttling)",
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
    "internal_error": "an unexpected error while handling the row (a bug: the message names it)",
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
    resumed: bool = False  # bytes came from the resume store of an interrupted run, not the network


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
    try:
        orientation = img.getexif().get(0x0112, 1)
        if orientation not in (1, None):
            img = ImageOps.exif_transpose(img)
    except Exception as exc:  # corrupt EXIF block
        raise Rejected("decode_error", f"EXIF: {type(exc).__name__}: {exc}") from None
    w, h = img.size
    if min(w, h) < p.min_side:
        raise Rejected("too_small", f"{w}x{h}: shorter side < min_side {p.min_side}")
    if max(w, h) > p.max_side:
        raise Rejected("too_large", f"{w}x{h}: longer side > max_side {p.max_side}")
    if max(w, h) / min(w, h) > p.max_aspect:
        raise Rejected("bad_aspect", f"{w}x{h}: aspect {max(w, h) / min(w, h):.1f} > max_aspect {p.max_aspect}")
    passthrough = fmt in ("JPEG", "PNG") and mode in ("RGB", "L") and orientation in (1, None)
    try:
        rgb = img if passthrough else _to_rgb(img)
    except Exception as exc:  # a mode Pillow decodes but cannot convert
        raise Rejected("decode_error", f"to RGB: {type(exc).__name__}: {exc}") from None
    facts = {"width": w, "height": h, "format": fmt, "mode": mode}
    return rgb, facts, (data if passthrough else None)


def stored_relpath(sha: str, fmt: str) -> str:
    ext = "jpg" if fmt == "JPEG" else "png"
    return f"images/{sha[:2]}/{sha}.{ext}"


# --------------------------------------------------------------------------------------------- fetching
class ResumeStore:
    """The raw bytes of remote rows already fetched by a run that did not finish (outage, kill, failed check).

    DVC removes a stage's outputs before it reruns, so what an interrupted ingest fetched must live elsewhere:
    `ingest.resume_dir`, keyed by the row's source text. A rerun reads these instead of the network and fetches
    only the rest; a run that ends with its outputs written empties it (the next run fetches afresh).
    """

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None

    def _path(self, source: str) -> Path:
        key = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
        return self.folder / key[:2] / key  # type: ignore[operator]

    def get(self, source: str) -> bytes | None:
        if self.folder is None:
            return None
        path = self._path(source)
        return path.read_bytes() if path.is_file() else None

    def put(self, source: str, data: bytes) -> None:
        if self.folder is not None:
            atomic_write_bytes(self._path(source), data)

    def count(self) -> int:
        return sum(1 for f in self.folder.rglob("*") if f.is_file()) if self.folder and self.folder.exists() else 0

    def clear(self) -> None:
        if self.folder is not None and self.folder.exists():

            shutil.rmtree(self.folder)


class _Ingestor:
    def __init__(self, p: IngestParams, storage: Storage, root: Path, out: Path, resume: ResumeStore):
        self.p, self.storage, self.root, self.out, self.resume = p, storage, root, out, resume

    def process(self, row: int, cell: object) -> Outcome:
        """Exactly one outcome for any cell: nothing raised here can stop the stage except missing credentials."""
        shown = shown_cell(cell)
        try:
            source = parse_source(cell, self.root, self.p.allow_outside_root, self.p.max_url_length)
            data, resumed = self._fetch(source)
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
            return Outcome(row, shown, sha256=sha, bytes=len(data), stored_format=stored_fmt, resumed=resumed,
                           **facts)
        except (Rejected, SourceRejected) as rej:
            return Outcome(row, shown, reason=rej.reason, message=_first_line(rej.message))
        except CredentialsError:
            raise  # fatal for the stage: every s3 row would fail the same way
        except Exception as exc:  # the per-row boundary: the unexpected is recorded, never raised
            return Outcome(row, shown, reason="internal_error", message=_first_line(f"{type(exc).__name__}: {exc}"))

    def _fetch(self, source: Source) -> tuple[bytes, bool]:
        if source.remote and (cached := self.resume.get(source.target)) is not None:
            return cached, True
        try:
            data = self.storage.read_bytes_with_retries(
                source.target, self.p.max_bytes, self.p.http_retries, self.p.retry_backoff_s
            )
        except TooLargeError as exc:
            raise Rejected("too_many_bytes", _safe(str(exc), source)) from None
        except CredentialsError:
            raise
        except StorageError as exc:
            raise Rejected("fetch_transient" if exc.transient else "fetch_error", _safe(str(exc), source)) from None
        if source.remote:
            self.resume.put(source.target, data)
        return data, False


def _first_line(message: str, limit: int = 300) -> str:
    lines = message.strip().splitlines()
    return lines[0][:limit] if lines else ""


def _safe(message: str, source: Source) -> str:
    """A storage message with the row's own text in place of the resolved target, credentials redacted."""
    return message.replace(source.target, source.shown)


def read_crawl_manifest(path: str | Path, url_column: str) -> pd.DataFrame:
    if not Path(path).exists():
        raise FileNotFoundError(f"crawl manifest {path} not found (set ingest.manifest)")
    # Blank lines are rows too (skip_blank_lines=False): a crawl row must never vanish before it has an outcome.
    frame = read_user_table(path, "crawl manifest", (url_column,), dtype=str, keep_default_na=False,
                            skip_blank_lines=False)
    if frame.empty:
        raise ValueError(f"crawl manifest {path}: no rows under its header (nothing to ingest)")
    return frame


def run_ingest(params: Params) -> IngestResult:
    """Fetch, verify, normalise and store every crawl row; write the three tables and the metrics."""
    p = params.ingest
    out = Path(p.out)
    crawl = read_crawl_manifest(p.manifest, p.url_column)
    urls = crawl[p.url_column].tolist()
    storage = Storage.from_params(params.storage, http_timeout_s=p.http_timeout_s, http_deadline_s=p.http_deadline_s)
    resume = ResumeStore(p.resume_dir)
    ingestor = _Ingestor(p, storage, Path(p.manifest).parent, out, resume)
    # Outputs are rebuilt from scratch so a rerun is byte-identical and nothing stale survives.
    for name in ("manifest.parquet", "duplicates.parquet", "quarantine.parquet"):
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    if p.parts > 1:
        from tasks import ingest_parts  # it imports this module: the per-row ingestor is the same code

        outcomes = ingest_parts.ingest_in_parts(params, urls)
    else:
        outcomes: list[Outcome] = [None] * len(urls)  # type: ignore[no-redef]
        with ThreadPoolExecutor(max_workers=p.workers) as pool:
            futures = pool.map(lambda item: ingestor.process(*item), enumerate(urls))
            for outcome in tqdm(futures, total=len(urls), desc="ingest", unit="img", **progress_kwargs()):
                outcomes[outcome.row] = outcome
    elapsed = time.perf_counter() - start
    _fail_on_outage(outcomes, p, resume)

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

    resume.clear()  # outputs are complete: a later run fetches afresh
    if p.parts > 1:
        ingest_parts.clear_parts(params, urls)
    by_reason = quarantine["reason"].value_counts().sort_index().to_dict()
    schemes = [scheme_of(u) if isinstance(u, str) and u.strip() else "empty" for u in urls]
    by_scheme = pd.Series(schemes).value_counts().sort_index().to_dict() if urls else {}
    metrics = {
        "input_rows": len(urls),
        "kept": len(manifest),
        "exact_duplicates": len(duplicates),
        "quarantined": len(quarantine),
        "reconciles": len(urls) == len(manifest) + len(duplicates) + len(quarantine),
        "quarantine_by_reason": {k: int(v) for k, v in by_reason.items()},
        "input_by_scheme": {k: int(v) for k, v in by_scheme.items()},
        "transient_failures": int(by_reason.get("fetch_transient", 0)),
        "internal_errors": int(by_reason.get("internal_error", 0)),
        "resumed_from_interrupted_run": sum(o.resumed for o in outcomes),
        "stored_bytes": int(sum(f.stat().st_size for f in (out / "images").rglob("*") if f.is_file()))
        if (out / "images").exists() else 0,
        "seconds": round(elapsed, 3),
        "images_per_second": round(len(urls) / elapsed, 1) if elapsed > 0 else None,
        "workers": p.workers,
        "parts": p.parts,
        "params": params_record(p),
    }
    write_metrics(params.reports, "ingest", metrics)
    log.info("ingest: %d rows -> %d kept, %d exact duplicates, %d quarantined %s (%.0f img/s)",
             len(urls), len(manifest), len(duplicates), len(quarantine), metrics["quarantine_by_reason"],
             metrics["images_per_second"] or 0)
    if manifest.empty:  # counts and quarantine stay written to look at; the stages after it would fail obscurely
        top = ", ".join(f"{reason} {n}" for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1])[:3])
        raise ValueError(f"ingest: none of the {len(urls)} crawl rows was kept ({top}; each "
                         f"row's reason in {out / 'quarantine.parquet'}): fix the crawl, or the limits "
                         "ingest.min_side / max_side / max_bytes / max_pixels if they refuse good images")
    return IngestResult(manifest, duplicates, quarantine, metrics)


def _fail_on_outage(outcomes: list[Outcome], p: IngestParams, resume: ResumeStore) -> None:
    """An outage must not end in a silently smaller dataset: above `max_transient_fraction` the stage fails with a
    transient error (the flow retries it) and keeps what it fetched for the rerun."""
    transient = [o for o in outcomes if o.reason == "fetch_transient"]
    fraction = len(transient) / max(1, len(outcomes))
    if fraction <= p.max_transient_fraction:
        return
    example = transient[0].message.splitlines()[0][:160] if transient else ""
    kept = f"; {resume.count()} fetched rows kept in {resume.folder} for the rerun" if resume.folder else ""
    raise StorageError(
        f"ingest: {len(transient)} of {len(outcomes)} rows ({fraction:.2%}) hit network/S3 faults that outlasted "
        f"the retries (above ingest.max_transient_fraction {p.max_transient_fraction:g}), e.g. {example}{kept}; "
        "rerun when the source is reachable", transient=True)


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
