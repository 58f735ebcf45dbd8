"""Embeddings of stored images, computed once per (embedder, sha256) and reused by every stage and rerun.

Curation stages ask for the embeddings of a list of image identities; whatever is already in the cache
(`<cache_dir>/<embedder id>.npz`, outside DVC outputs so a changed threshold does not re-embed; the id digests the
embedder's config, weights and code, so nothing computed by other code is reused) is reused, the
rest is embedded in batches with a progress bar and appended. Vectors are stored as float32, L2-normalised.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from dinov2_core.atomic import atomic_write_bytes
from tasks.log import get_logger, progress_kwargs

log = get_logger("embeddings")


class Embedder(Protocol):
    """Anything that maps RGB images to L2-normalised float32 vectors, with a stable identity."""

    id: str
    dim: int

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray: ...


@dataclass
class EmbeddingStats:
    embedder: str
    requested: int = 0
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def per_second(self) -> float | None:
        return round(self.computed / self.seconds, 1) if self.computed and self.seconds > 0 else None

    def as_dict(self) -> dict:
        return {"embedder": self.embedder, "requested": self.requested, "computed": self.computed,
                "reused": self.reused, "seconds": round(self.seconds, 3), "embeddings_per_second": self.per_second,
                **self.extra}


_REPO = Path(__file__).resolve().parents[1]
# The code that turns pixels into vectors: the whole library plus the stage-side embedder wrappers.
EMBEDDING_CODE = ("dinov2_core", "tasks/backbones.py", "tasks/embeddings.py")


@functools.cache
def source_digest(*paths: str) -> str:
    """sha256 over the Python sources under `paths` (repo-relative files or folders): a cache keyed by it is never
    reused after the code that computed it changed, which a key made of params and weights alone would be."""
    h = hashlib.sha256()
    for rel in paths:
        root = _REPO / rel
        for file in sorted([root] if root.is_file() else root.rglob("*.py")):
            h.update(file.relative_to(_REPO).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def embedder_cache_id(name: str, config: dict) -> str:
    """A file-safe id that changes whenever the embedder's name, configuration (e.g. weights hash) or code does."""
    payload = {**config, "code": source_digest(*EMBEDDING_CODE)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{name}-{digest}"


def embed_keys(keys: Sequence[str], load: Callable[[str], Image.Image], embedder: Embedder,
               cache_dir: str | Path | None, batch_size: int = 256, desc: str = "embed",
               parallel: Callable[[list[str]], np.ndarray] | None = None) -> tuple[np.ndarray, EmbeddingStats]:
    """Vectors for `keys` (in order), reusing the cache; `load(key)` returns the RGB image for a key.
    `parallel(missing)`, when given, computes the missing vectors instead (the data-parallel job of
    tasks/embed_job.py), so the cache works the same whichever computed them."""
    stats = EmbeddingStats(embedder.id, requested=len(keys))
    cache_path = Path(cache_dir) / f"{embedder.id}.npz" if cache_dir else None
    cached: dict[str, int] = {}
    cached_vecs = np.zeros((0, embedder.dim), dtype=np.float32)
    if cache_path and cache_path.exists():
        with np.load(cache_path, allow_pickle=False) as data:
            cached_keys, cached_vecs = data["keys"], data["vectors"].astype(np.float32)
        cached = {str(k): i for i, k in enumerate(cached_keys)}
    missing = sorted({k for k in keys if k not in cached})
    new_vecs = np.zeros((0, embedder.dim), dtype=np.float32)
    if missing:
        start = time.perf_counter()
        new_vecs = _compute(missing, load, embedder, batch_size, desc) if parallel is None \
            else np.asarray(parallel(missing), dtype=np.float32)
        if new_vecs.shape != (len(missing), embedder.dim):
            raise ValueError(f"embedder {embedder.id} returned {new_vecs.shape}, expected "
                             f"({len(missing)}, {embedder.dim})")
        stats.seconds = time.perf_counter() - start
        stats.computed = len(missing)
        if cache_path:
            all_keys = np.array(list(cached) + missing)
            all_vecs = np.concatenate([cached_vecs, new_vecs])

            buf = io.BytesIO()
            np.savez(buf, keys=all_keys, vectors=all_vecs)
            atomic_write_bytes(cache_path, buf.getvalue())
    stats.reused = len(set(keys)) - len(missing)
    new_index = {k: i for i, k in enumerate(missing)}
    out = np.empty((len(keys), embedder.dim), dtype=np.float32)
    for row, k in enumerate(keys):
        out[row] = new_vecs[new_index[k]] if k in new_index else cached_vecs[cached[k]]
    return out, stats


def _compute(keys: list[str], load: Callable[[str], Image.Image], embedder: Embedder, batch_size: int,
             desc: str) -> np.ndarray:
    parts = []
    with tqdm(total=len(keys), desc=desc, unit="img", **progress_kwargs()) as bar:
        for i in range(0, len(keys), batch_size):
            batch = keys[i: i + batch_size]
            parts.append(np.asarray(embedder.embed([load(k) for k in batch]), dtype=np.float32))
            bar.update(len(batch))
    return np.concatenate(parts)


def save_embeddings(path: str | Path, keys: Sequence[str], vectors: np.ndarray, embedder_id: str) -> Path:
    """A stage's own copy of the embeddings it used (keys + float16 vectors), so the next stage can reuse them."""

    buf = io.BytesIO()
    np.savez(buf, keys=np.asarray(keys), vectors=vectors.astype(np.float16), embedder=np.asarray(embedder_id))
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_embeddings(path: str | Path) -> tuple[list[str], np.ndarray, str]:
    with np.load(path, allow_pickle=False) as data:
        return [str(k) for k in data["keys"]], data["vectors"].astype(np.float32), str(data["embedder"])
