"""Ingest in parts: the crawl's rows split into `ingest.parts` contiguous parts, one `torchrun` rank each.

Every rank runs the same per-row ingestor (fetch, verify, normalise, store) over its part with `ingest.workers`
threads and writes the part's outcomes, whole, as one Parquet file; the stage merges them in row order and decides
duplicates and quarantine exactly as one worker does, so the outputs are identical. The image store is content
addressed (sha256 names, written by atomic rename), so two parts storing the same image cannot collide. A part
whose outcome file exists is not redone: after a killed rank, the rerun ingests only the missing parts. The part
files live under `ingest.resume_dir`, keyed by the crawl, the params that decide outcomes and the code, and are
removed when the stage succeeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields
from pathlib import Path

import pandas as pd
import yaml

from dinov2_core.atomic import atomic_path
from tasks.embeddings import source_digest
from tasks.ingest import Outcome, ResumeStore, _Ingestor, read_crawl_manifest
from tasks.local_ranks import run_local_ranks
from tasks.log import get_logger
from tasks.params import Params, load_params, params_record
from tasks.storage import CredentialsError, Storage

log = get_logger("ingest")

FAULT_ENV = "DINOV2_FAULT_INGEST_PART"  # test-only: that part's rank dies before writing its outcomes
# what decides a row's outcome; threads and the number of parts do not
_NOT_OUTCOME = {"workers", "parts", "out", "resume_dir"}


class PartsFailed(RuntimeError):
    """Some part workers died; the parts they finished are kept and a rerun ingests only the others."""

    transient = True


def part_bounds(n_rows: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) row ranges, sizes differing by at most one."""
    step, extra = divmod(n_rows, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + step + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def parts_folder(params: Params, urls: list) -> Path:
    p = params.ingest
    key = json.dumps({"urls": [str(u) for u in urls], "manifest": str(Path(p.manifest).resolve()),
                      "params": {k: v for k, v in params_record(p).items() if k not in _NOT_OUTCOME},
                      "storage": params_record(params.storage),
                      "code": source_digest("tasks/ingest.py", "tasks/sources.py", "tasks/storage.py")},
                     sort_keys=True, default=str)
    base = Path(p.resume_dir) if p.resume_dir else Path(p.out).parent / f".{Path(p.out).name}-parts"
    return base / "parts" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _part_file(folder: Path, part: int) -> Path:
    return folder / f"part-{part:05d}.parquet"


def run_part(params: Params, part: int, folder: Path) -> None:
    """Ingest one part's rows and write its outcomes (skipped when they exist)."""
    target = _part_file(folder, part)
    if target.exists():
        return
    p = params.ingest
    urls = read_crawl_manifest(p.manifest, p.url_column)[p.url_column].tolist()
    start, stop = part_bounds(len(urls), p.parts)[part]
    storage = Storage.from_params(params.storage, http_timeout_s=p.http_timeout_s, http_deadline_s=p.http_deadline_s)
    ingestor = _Ingestor(p, storage, Path(p.manifest).parent, Path(p.out), ResumeStore(p.resume_dir))
    with ThreadPoolExecutor(max_workers=p.workers) as pool:
        outcomes = list(pool.map(lambda row: ingestor.process(row, urls[row]), range(start, stop)))
    if os.environ.get(FAULT_ENV) == str(part):
        _die_after_the_others(folder, part, p.parts)
    frame = pd.DataFrame([asdict(o) for o in outcomes], columns=[f.name for f in fields(Outcome)])
    with atomic_path(target) as tmp:
        frame.to_parquet(tmp, index=False)


def _die_after_the_others(folder: Path, part: int, parts: int) -> None:
    """Test-only fault: once the other parts are written, exit the way a killed process does."""
    deadline = time.time() + 120
    while time.time() < deadline and not all(_part_file(folder, i).exists() for i in range(parts) if i != part):
        time.sleep(0.1)
    os._exit(1)


def ingest_in_parts(params: Params, urls: list) -> list[Outcome]:
    """All rows' outcomes, in row order, computed by one rank per part."""
    p = params.ingest
    folder = parts_folder(params, urls)
    folder.mkdir(parents=True, exist_ok=True)
    done = sum(_part_file(folder, i).exists() for i in range(p.parts))
    if done < p.parts:
        params_file = folder / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
        log.info("ingest: %d rows in %d parts (%d already done), one process each", len(urls), p.parts, done)
        proc = run_local_ranks("tasks.ingest_parts", [str(params_file), str(folder)], p.parts)
        refused = folder / "credentials.txt"
        if refused.exists():  # every part would fail the same way: not worth a retry
            message = refused.read_text().strip()
            refused.unlink()
            raise CredentialsError(message)
        missing = [i for i in range(p.parts) if not _part_file(folder, i).exists()]
        if proc.returncode != 0 or missing:
            raise PartsFailed(f"ingest: {len(missing)} of {p.parts} part(s) did not finish (worker exit "
                              f"{proc.returncode}); the others are kept in {folder}: a rerun ingests only those")
    frames = [pd.read_parquet(_part_file(folder, i)) for i in range(p.parts)]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[f.name for f in fields(Outcome)])
    outcomes = [Outcome(**{k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()})
                for rec in rows.to_dict("records")]
    if [o.row for o in outcomes] != list(range(len(urls))):
        raise PartsFailed(f"ingest: the part files in {folder} do not cover rows 0..{len(urls) - 1}")
    return outcomes


def clear_parts(params: Params, urls: list) -> None:
    """The stage's outputs are complete: a later run ingests afresh."""
    shutil.rmtree(parts_folder(params, urls), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    params, folder = load_params(args[0]), Path(args[1])
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        for part in range(rank, params.ingest.parts, world):
            run_part(params, part, folder)
    except CredentialsError as exc:
        (folder / "credentials.txt").write_text(str(exc).splitlines()[0] + "\n")
        return 77
    return 0


if __name__ == "__main__":
    sys.exit(main())
