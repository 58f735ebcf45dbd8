"""Data-parallel embedding: N `torchrun` ranks each embed a disjoint set of slices of the key list.

Slice i (rows [i*slice_size, (i+1)*slice_size) of the keys) belongs to rank i mod N and is written once, whole, as
`<out>/slice-<i>.npz` (its keys + float16 vectors; an atomic rename locally, one PUT on `s3://`), so a rerun after a
killed rank embeds only the slices that are missing. Merged in slice order, the vectors are in the keys' order, the
same as one process gives. Curation stages use it through `tasks.embeddings.embed_keys` when their embedder's
`processes` is above 1 (`python -m tasks.embed_job JOB.json` is the worker).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tasks.backbones import copy_detection_views_embedder, make_embedder
from tasks.image_store import ImageStore
from tasks.local_ranks import run_local_ranks
from tasks.log import get_logger
from tasks.sections import EmbedderParams, StorageParams
from tasks.storage import Storage, scheme_of

log = get_logger("embed_job")

FAULT_ENV = "DINOV2_FAULT_EMBED"  # test-only: "<rank>:<slices>": that rank dies after writing that many slices
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class EmbedJob:
    keys: list[str]
    images: str  # the ingest store (manifest.parquet + images/): workers load keys from it
    embedder: EmbedderParams
    storage: StorageParams
    out: str  # folder or s3:// prefix for the slices
    views: bool = False  # the copy-detection descriptor's centre-crop views (dedup), flattened

    @property
    def n_slices(self) -> int:
        return -(-len(self.keys) // self.embedder.slice_size)

    def slice_keys(self, i: int) -> list[str]:
        size = self.embedder.slice_size
        return self.keys[i * size:(i + 1) * size]

    def slice_url(self, i: int) -> str:
        return f"{self.out.rstrip('/')}/slice-{i:06d}.npz"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "embedder": self.embedder.model_dump(mode="json"),
                           "storage": self.storage.model_dump(mode="json")})

    @classmethod
    def from_json(cls, text: str) -> EmbedJob:
        raw = json.loads(text)
        return cls(**{**raw, "embedder": EmbedderParams(**raw["embedder"]),
                      "storage": StorageParams(**raw["storage"])})


def job_folder(cache_root: str, embedder_id: str, keys: list[str]) -> str:
    """Where a key list's slices go: per embedder (its id digests config, weights and code) and per key list."""
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
    return f"{cache_root.rstrip('/')}/slices/{embedder_id}/{digest}"


def run_rank(job: EmbedJob, rank: int, world: int) -> dict[str, int]:
    """Embed this rank's missing slices; returns {"computed": n, "present": m} slices."""
    storage = Storage.from_params(job.storage)
    store = ImageStore(job.images)
    embedder = copy_detection_views_embedder() if job.views else make_embedder(job.embedder, storage)
    fault = os.environ.get(FAULT_ENV, "")
    die_rank, die_after = (int(x) for x in fault.split(":")) if fault else (-1, 0)
    counts = {"computed": 0, "present": 0}
    for i in range(rank, job.n_slices, world):
        url = job.slice_url(i)
        if storage.exists(url):
            counts["present"] += 1
            continue
        keys = job.slice_keys(i)
        parts = []
        for j in range(0, len(keys), job.embedder.batch_size):
            batch = keys[j:j + job.embedder.batch_size]
            parts.append(np.asarray(embedder.embed([store.load(k) for k in batch]), dtype=np.float32))
        buf = io.BytesIO()
        np.savez(buf, keys=np.asarray(keys), vectors=np.concatenate(parts).astype(np.float16))
        storage.write_bytes(url, buf.getvalue())
        counts["computed"] += 1
        if rank == die_rank and counts["computed"] >= die_after:
            _die_after_the_others(job, storage, rank, world)
    return counts


def _die_after_the_others(job: EmbedJob, storage: Storage, rank: int, world: int) -> None:
    """Test-only fault: once the other ranks' slices are written (so what is missing is exactly this rank's),
    exit the way a killed process does: no cleanup, no exception."""
    others = [i for i in range(job.n_slices) if i % world != rank]
    deadline = time.time() + 120
    while time.time() < deadline and not all(storage.exists(job.slice_url(i)) for i in others):
        time.sleep(0.1)
    os._exit(1)


def read_slices(job: EmbedJob) -> np.ndarray:
    """The job's vectors (float32) in the order of `job.keys`, checked against each slice's own keys."""
    storage = Storage.from_params(job.storage)
    out = []
    for i in range(job.n_slices):
        with np.load(io.BytesIO(storage.read_bytes(job.slice_url(i))), allow_pickle=False) as data:
            if [str(k) for k in data["keys"]] != job.slice_keys(i):
                raise ValueError(f"{job.slice_url(i)}: holds other keys than slice {i} of this job (stale folder?)")
            out.append(data["vectors"].astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def embed_parallel(job: EmbedJob) -> tuple[np.ndarray, dict[str, float]]:
    """Run the job on `job.embedder.processes` torchrun ranks (in this process when 1), then merge."""
    start = time.perf_counter()
    storage = Storage.from_params(job.storage)
    before = sum(storage.exists(job.slice_url(i)) for i in range(job.n_slices))
    processes = job.embedder.processes
    if processes == 1:
        run_rank(job, 0, 1)
    else:
        job_file = Path(job.out) / "job.json" if scheme_of(job.out) == "local" else None
        if job_file is None:  # the workers need the job on a local path: a temporary file beside the cache
            job_file = ROOT / ".dvc" / "tmp" / f"embed-job-{os.getpid()}.json"
        job_file.parent.mkdir(parents=True, exist_ok=True)
        job_file.write_text(job.to_json())
        proc = run_local_ranks("tasks.embed_job", [str(job_file)], processes)
        if proc.returncode != 0:
            missing = sum(not storage.exists(job.slice_url(i)) for i in range(job.n_slices))
            raise RuntimeError(f"embedding workers failed (exit {proc.returncode}); {missing} of {job.n_slices} "
                               f"slice(s) missing under {job.out}: a rerun embeds only those")
    vectors = read_slices(job)
    stats = {"processes": processes, "slices": job.n_slices, "slices_reused": before,
             "seconds": round(time.perf_counter() - start, 3)}
    log.info("embedded %d keys in %d slice(s) on %d process(es), %d slice(s) reused (%.1f s)", len(job.keys),
             job.n_slices, processes, before, stats["seconds"])
    return vectors, stats


def parallel_embedder(embedder: EmbedderParams, images: str, storage: StorageParams, cache_dir: str | None,
                      embedder_id: str, views: bool = False) -> Callable[[list[str]], np.ndarray] | None:
    """For `tasks.embeddings.embed_keys(parallel=...)`: the missing keys of an image store embedded by the
    data-parallel job, or None with one process (the in-process path)."""
    if embedder.processes == 1:
        return None
    if not cache_dir:
        raise ValueError("embedder.processes > 1 writes slices under the stage's cache_dir: set it")

    def run(missing: list[str]) -> np.ndarray:
        job = EmbedJob(missing, images, embedder, storage, job_folder(cache_dir, embedder_id, missing), views)
        return embed_parallel(job)[0]

    return run


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    job = EmbedJob.from_json(Path(args[0]).read_text())
    run_rank(job, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
