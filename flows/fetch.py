"""Fetch any stage's output (or a file inside it) as it was at a git revision or after a given flow run.

Which bytes belong to a revision/run is written in that revision's/run's `dvc.lock`; DVC itself reads them from
the remote. The revision's (`git show REV:...`), the run record's (`<remote>/runs/<id>/`, read through the storage
stack) or the working tree's `dvc.yaml`, `dvc.lock` and `params.yaml` go into a throw-away DVC project with no git
and no cache, and `dvc.api.DVCFileSystem` over it downloads the output from the remote: the same machinery as
`dvc get --rev`, but it also works for runs that were never committed, and it reads nothing but the remote (never
the local cache, so a fetch proves the remote holds the run). Every file's MD5 is checked against the lock before
it is moved into place. Outputs DVC does not cache (`cache: false` metrics) come from the run record or git.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dinov2_core.atomic import atomic_write_bytes
from flows.remote import (
    CredentialsRejected,
    Output,
    RemoteError,
    RemoteSpec,
    RemoteStore,
    dvc_config,
    git_show,
    lock_outputs,
    md5_bytes,
    resolve_remote,
    root_cause,
    translate_remote_error,
)
from tasks.stages import STAGES


@dataclass
class Fetched:
    path: str  # project-relative path of what was fetched
    dest: Path
    files: int
    bytes: int
    source: str


@dataclass
class _Snapshot:
    """What one revision / run / the working tree says the pipeline's files were."""

    files: dict[str, str]  # dvc.lock, dvc.yaml, params.yaml (when there)
    source: str
    rev: str | None = None
    run: str | None = None


def _snapshot(project: Path, store: RemoteStore, rev: str | None, run: str | None) -> _Snapshot:
    if rev and run:
        raise RemoteError("give --rev or --run, not both")
    names = ("dvc.lock", "dvc.yaml", "params.yaml")
    files: dict[str, str] = {}
    if run:
        for name in names:
            try:
                files[name] = store.read(store.spec.key("runs", run, name)).decode()
            except RemoteError as exc:
                if exc.transient or isinstance(exc, CredentialsRejected) or "not found" not in str(exc):
                    raise
                if name == "dvc.lock":
                    raise RemoteError(f"run '{run}' has no run record in remote '{store.spec.name}' "
                                      f"({store.spec.url}/runs/)") from None
        return _Snapshot(files, f"run {run}", run=run)
    if rev:
        for name in names:
            try:
                files[name] = git_show(project, rev, name)
            except RemoteError:
                if name == "dvc.lock":
                    raise
        return _Snapshot(files, f"revision {rev}", rev=rev)
    if not (project / "dvc.lock").exists():
        raise RemoteError(f"{project}: no dvc.lock (run the pipeline first, or pass --rev/--run)")
    files = {name: (project / name).read_text() for name in names if (project / name).exists()}
    return _Snapshot(files, "working tree")


def _resolve_target(target: str, outputs: dict[str, list[Output]], source: str = "") -> list[tuple[Output, str]]:
    """(output, sub-path inside it) pairs for a stage name, an output path, or a path inside a directory output."""
    if target in STAGES and target not in outputs:
        ran = ", ".join(outputs) or "none"
        raise RemoteError(f"stage '{target}' has no outputs in the dvc.lock of the {source or 'revision'}: it had not "
                          f"run there (stages that had: {ran})")
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


def _uncached_bytes(project: Path, store: RemoteStore, snap: _Snapshot, path: str) -> bytes | None:
    """A `cache: false` output as the run record / the revision / the working tree holds it (None: not there)."""
    if snap.run:
        try:
            return store.read(store.spec.key("runs", snap.run, path))
        except RemoteError as exc:
            if exc.transient or isinstance(exc, CredentialsRejected):
                raise
            return None
    if snap.rev:
        try:
            return git_show(project, snap.rev, path, binary=True)
        except RemoteError:
            return None
    file = project / path
    return file.read_bytes() if file.is_file() else None


def _dvc_project(root: Path, snap: _Snapshot) -> None:
    """A DVC project without git or cache holding the snapshot's pipeline files: what DVCFileSystem reads."""
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    for name, text in snap.files.items():
        (root / name).write_text(text)


def _remote_config(project: Path, spec: RemoteSpec) -> dict:
    """The project's remote section (config + config.local, as DVC merges them) for the throw-away project, with
    credentials from a Prefect block on top."""
    section = dict(dvc_config(project).get("remote", {}).get(spec.name, {}))
    section["url"] = spec.url
    for key, value in (("access_key_id", spec.access_key_id), ("secret_access_key", spec.secret_access_key),
                       ("session_token", spec.session_token)):
        if value:
            section[key] = value
    return {"core": {"remote": spec.name}, "remote": {spec.name: section}}


def _download_error(exc: BaseException, spec: RemoteSpec, what: str, source: str) -> RemoteError:
    root = root_cause(exc)
    if isinstance(root, FileNotFoundError) or isinstance(exc, FileNotFoundError):
        return RemoteError(f"{what}: not in remote '{spec.name}' ({spec.url}) at {source} "
                           f"(was it pushed? `dvc push` after the run, or the flow's push step)")
    return translate_remote_error(root, spec, what)


def _lock_md5(info: dict, path: str) -> str:
    md5 = (info.get("dvc_info") or {}).get("md5")
    if not md5:
        raise RemoteError(f"{path}: the lock gives no MD5 for it, so it cannot be verified")
    return md5


def _move_verified(staging: Path, dest: Path, expected: dict[str, str], what: str) -> tuple[int, int]:
    """Check every staged file against its hash from the lock, then move them into place (all or nothing)."""
    total = 0
    for rel, md5 in expected.items():
        data = (staging / rel).read_bytes() if (staging / rel).is_file() else b""
        if md5_bytes(data) != md5:
            raise RemoteError(f"{what}/{rel}".rstrip("/") + f": downloaded bytes do not match their hash {md5}")
        total += len(data)
    for rel in expected:
        target = dest / rel if rel else dest
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, target)
    return len(expected), total


def fetch(target: str, out_dir: str | Path, project: str | Path = ".", rev: str | None = None,
          run: str | None = None, remote: str | None = None, credentials: dict | None = None) -> list[Fetched]:
    """Download `target` into `out_dir/<its project-relative path>`; every file is MD5-verified."""
    from dvc.api import DVCFileSystem

    project = Path(project).resolve()
    out_dir = Path(out_dir)
    spec = resolve_remote(project, remote)
    if spec is None:
        raise RemoteError(f"{project}: no DVC remote configured (pass --remote or `dvc remote add -d`)")
    store = RemoteStore(spec.with_credentials(credentials))
    spec = store.spec
    snap = _snapshot(project, store, rev, run)
    if "dvc.yaml" not in snap.files:
        raise RemoteError(f"no dvc.yaml at {snap.source}: DVC cannot tell that revision's/run's outputs apart")
    outputs = lock_outputs(snap.files["dvc.lock"], snap.files["dvc.yaml"])
    fetched: list[Fetched] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dinov2-fetch-") as tmp, \
            tempfile.TemporaryDirectory(prefix=".fetch-", dir=out_dir) as staging_root:
        root = Path(tmp)
        _dvc_project(root, snap)
        fs = None
        for n, (out, sub) in enumerate(_resolve_target(target, outputs, snap.source)):
            if not out.md5:
                continue
            path = f"{out.path}/{sub}" if sub else out.path
            if not out.cached:  # metrics (`cache: false`): in the run record, or in git if committed there
                data = _uncached_bytes(project, store, snap, out.path)
                if data is None:
                    if target == out.stage:
                        continue  # fetching a whole stage: its uncached metrics are optional
                    raise RemoteError(f"{out.path} is not cached by DVC (cache: false) and not in git at "
                                      f"{snap.source}; fetch it with --run RUN_ID from a run record")
                if md5_bytes(data) != out.md5:
                    raise RemoteError(f"{out.path}: downloaded bytes do not match their hash {out.md5}")
                atomic_write_bytes(out_dir / out.path, data)
                fetched.append(Fetched(out.path, out_dir / out.path, 1, len(data), snap.source))
                continue
            if fs is None:
                fs = DVCFileSystem(str(root), config=_remote_config(project, spec))
            staging = Path(staging_root) / str(n)
            try:
                if not fs.exists(path):
                    raise RemoteError(f"{path}: not in that output at {snap.source}")
                if fs.isdir(path):
                    infos = fs.find(path, detail=True)
                    expected = {PurePosixPath(p).relative_to(path).as_posix(): _lock_md5(info, p)
                                for p, info in infos.items()}
                else:
                    expected = {"": _lock_md5(fs.info(path), path)}
                fs.get(path, str(staging), recursive=True)
            except RemoteError:
                raise
            except Exception as exc:
                raise _download_error(exc, spec, path, snap.source) from None
            files, total = _move_verified(staging, out_dir / path, expected, path)
            fetched.append(Fetched(path, out_dir / path, files, total, snap.source))
    if not fetched:
        raise RemoteError(f"nothing to fetch for '{target}' at {snap.source}")
    return fetched


__all__ = ["Fetched", "fetch"]
