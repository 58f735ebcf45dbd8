"""Fetch any stage's output (or a file inside it) as it was at a git revision or after a given flow run.

Which bytes belong to a revision/run is written in that revision's/run's `dvc.lock` (hashes); the bytes
themselves are the remote's content-addressed objects. So: read the right dvc.lock (`git show REV:dvc.lock`,
the run record `runs/<id>/dvc.lock` in the remote, or the working tree's), look the path up, download the
objects and check every file's MD5 before it is moved into place. Same result as `dvc get --rev` but it also
works for runs that were never committed, and it reads nothing but the remote.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dinov2_core.atomic import atomic_write_bytes
from flows.remote import (
    CredentialsRejected,
    Output,
    RemoteError,
    RemoteStore,
    dir_listing,
    git_show,
    lock_outputs,
    md5_bytes,
    resolve_remote,
)


@dataclass
class Fetched:
    path: str  # project-relative path of what was fetched
    dest: Path
    files: int
    bytes: int
    source: str


def _locks(project: Path, store: RemoteStore, rev: str | None, run: str | None) -> tuple[str, str | None, str]:
    if rev and run:
        raise RemoteError("give --rev or --run, not both")
    if run:
        try:
            lock = store.read(store.spec.key("runs", run, "dvc.lock")).decode()
        except RemoteError as exc:
            if exc.transient or isinstance(exc, CredentialsRejected) or "not found" not in str(exc):
                raise
            raise RemoteError(f"run '{run}' has no run record in remote '{store.spec.name}' "
                              f"({store.spec.url}/runs/)") from None
        try:
            dvc_yaml = store.read(store.spec.key("runs", run, "dvc.yaml")).decode()
        except RemoteError:
            dvc_yaml = None
        return lock, dvc_yaml, f"run {run}"
    if rev:
        lock = git_show(project, rev, "dvc.lock")
        try:
            dvc_yaml = git_show(project, rev, "dvc.yaml")
        except RemoteError:
            dvc_yaml = None
        return lock, dvc_yaml, f"revision {rev}"
    lock_path = project / "dvc.lock"
    if not lock_path.exists():
        raise RemoteError(f"{project}: no dvc.lock (run the pipeline first, or pass --rev/--run)")
    dvc_yaml_path = project / "dvc.yaml"
    return lock_path.read_text(), dvc_yaml_path.read_text() if dvc_yaml_path.exists() else None, "working tree"


def _resolve_target(target: str, outputs: dict[str, list[Output]]) -> list[tuple[Output, str]]:
    """(output, sub-path inside it) pairs for a stage name, an output path, or a path inside a directory output."""
    if target in outputs:
        return [(o, "") for o in outputs[target]]
    norm = PurePosixPath(target.strip("/")).as_posix()
    for outs in outputs.values():
        for out in outs:
            if norm == out.path:
                return [(out, "")]
            if norm.startswith(out.path.rstrip("/") + "/"):
                return [(out, norm[len(out.path.rstrip("/")) + 1:])]
    known = sorted(o.path for outs in outputs.values() for o in outs)
    raise RemoteError(f"'{target}' is neither a stage nor a stage output (outputs: {', '.join(known) or 'none'})")


def _write_verified(dest: Path, data: bytes, md5: str) -> None:
    if md5_bytes(data) != md5:
        raise RemoteError(f"{dest.name}: downloaded bytes do not match their hash {md5}")
    atomic_write_bytes(dest, data)


def fetch(target: str, out_dir: str | Path, project: str | Path = ".", rev: str | None = None,
          run: str | None = None, remote: str | None = None, credentials: dict | None = None) -> list[Fetched]:
    """Download `target` into `out_dir/<its project-relative path>`; every file is MD5-verified."""
    project = Path(project).resolve()
    out_dir = Path(out_dir)
    spec = resolve_remote(project, remote)
    if spec is None:
        raise RemoteError(f"{project}: no DVC remote configured (pass --remote or `dvc remote add -d`)")
    store = RemoteStore(spec.with_credentials(credentials))
    spec = store.spec
    lock, dvc_yaml, source = _locks(project, store, rev, run)
    outputs = lock_outputs(lock, dvc_yaml)
    fetched: list[Fetched] = []
    for out, sub in _resolve_target(target, outputs):
        if not out.md5:
            continue
        if not out.cached:  # metrics (`cache: false`): in the run record, or in git if committed there
            data = None
            if run:
                data = store.read(spec.key("runs", run, out.path))
            elif rev:
                proc = subprocess.run(["git", "show", f"{rev}:{out.path}"], cwd=project, capture_output=True, check=False)
                data = proc.stdout if proc.returncode == 0 else None
            if data is None:
                if target == out.stage:
                    continue  # fetching a whole stage: its uncached metrics are optional
                raise RemoteError(f"{out.path} is not cached by DVC (cache: false) and not in git at {source}; "
                                  f"fetch it with --run RUN_ID from a run record")
            _write_verified(out_dir / out.path, data, out.md5)
            fetched.append(Fetched(out.path, out_dir / out.path, 1, len(data), source))
            continue
        if not out.is_dir:
            if sub:
                raise RemoteError(f"{out.path} is a file, not a folder")
            data = store.read(spec.object_key(out.md5))
            _write_verified(out_dir / out.path, data, out.md5)
            fetched.append(Fetched(out.path, out_dir / out.path, 1, len(data), source))
            continue
        entries = dir_listing(store, out.md5)
        if sub:
            entries = [e for e in entries if e["relpath"] == sub or e["relpath"].startswith(sub.rstrip("/") + "/")]
            if not entries:
                raise RemoteError(f"{out.path}/{sub}: not in that output at {source}")
        total = 0
        for entry in entries:
            data = store.read(spec.object_key(entry["md5"]))
            _write_verified(out_dir / out.path / entry["relpath"], data, entry["md5"])
            total += len(data)
        path = f"{out.path}/{sub}" if sub else out.path
        fetched.append(Fetched(path, out_dir / path, len(entries), total, source))
    if not fetched:
        raise RemoteError(f"nothing to fetch for '{target}' at {source}")
    return fetched
