"""The DVC remote as the orchestration layer sees it: where it is, how to reach it, what is in it.

DVC owns the remote's layout and its own pushes; where an output's bytes live comes from DVC's public API
(`dvc.api.get_url`), fetching goes through `dvc.api.DVCFileSystem` (`flows.fetch`). This module writes one thing
beside DVC's objects: a per-run record under `<url>/runs/<run id>/` (dvc.lock, params, metrics, GX
results), because metrics files are `cache: false` in dvc.yaml and a flow run does not make a git commit.

Credentials are resolved in this order and never logged, printed or written anywhere by this module:
a Prefect Secret block named by the caller, the remote's `dvc remote modify --local` settings, then the usual
AWS environment / profile chain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from tasks.storage import CredentialsError, Storage, StorageError, redact_url, translate_error


class RemoteError(RuntimeError):
    """Something about the remote the user must fix (not configured, object missing); one line."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class CredentialsRejected(RemoteError):
    """S3 refused or could not find the credentials."""


# ----------------------------------------------------------------------------------------------- remote spec
@dataclass(frozen=True)
class RemoteSpec:
    name: str
    url: str  # s3://bucket/prefix or a local folder (absolute)
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")

    @property
    def bucket(self) -> str:
        return urlparse(self.url).netloc

    @property
    def prefix(self) -> str:
        return urlparse(self.url).path.strip("/") if self.is_s3 else ""

    def key(self, *parts: str) -> str:
        """Object key (S3) or relative path (local) under the remote's root."""
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p and p.strip("/"))

    def uri(self, key: str) -> str:
        """Human-facing address of a key: s3://bucket/key or the local file path."""
        if self.is_s3:
            return f"s3://{self.bucket}/{key}"
        return str(self.local_path(key))

    def local_path(self, key: str) -> Path:
        return Path(self.url) / key

    def http_url(self, uri: str) -> str | None:
        """Path-style URL of an `s3://bucket/key` address on the configured endpoint (for links in the UI); None for
        AWS defaults and local remotes."""
        parsed = urlparse(uri)
        if self.is_s3 and self.endpoint_url and parsed.scheme == "s3":
            return f"{self.endpoint_url.rstrip('/')}/{parsed.netloc}/{parsed.path.lstrip('/')}"
        return None

    def with_credentials(self, creds: dict[str, str] | None) -> RemoteSpec:
        if not creds:
            return self
        return RemoteSpec(self.name, self.url, self.endpoint_url, self.region,
                          creds.get("aws_access_key_id"), creds.get("aws_secret_access_key"),
                          creds.get("aws_session_token"))

    def dvc_credentials(self) -> dict[str, str]:
        """Explicit keys (a Prefect block, config.local) as DVC remote settings; empty: DVC's own chain."""
        keys = {"access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key,
                "session_token": self.session_token}
        return {k: v for k, v in keys.items() if v} if self.access_key_id and self.secret_access_key else {}

    def subprocess_env(self) -> dict[str, str]:
        """AWS_* variables for child processes (DVC) when credentials came from a Prefect block."""
        env = {}
        if self.access_key_id and self.secret_access_key:
            env["AWS_ACCESS_KEY_ID"] = self.access_key_id
            env["AWS_SECRET_ACCESS_KEY"] = self.secret_access_key
            if self.session_token:
                env["AWS_SESSION_TOKEN"] = self.session_token
        return env


def dvc_config(project: str | Path) -> dict[str, Any]:
    """DVC's merged configuration (system, global, repo, local) for a project."""
    from dvc.config import Config

    dvc_dir = Path(project) / ".dvc"
    if not dvc_dir.is_dir():
        raise RemoteError(f"{project}: not a DVC project (no .dvc folder)")
    return Config(dvc_dir=str(dvc_dir))


def remote_names(project: str | Path) -> tuple[list[str], str | None]:
    conf = dvc_config(project)
    return sorted(conf.get("remote", {})), conf.get("core", {}).get("remote")


def resolve_remote(project: str | Path, name: str | None = None) -> RemoteSpec | None:
    """The named remote, else the project's default remote, else None (no remote configured)."""
    conf = dvc_config(project)
    remotes = conf.get("remote", {})
    if not name:
        name = conf.get("core", {}).get("remote")
        if not name:
            return None
    if name not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        raise RemoteError(f"DVC remote '{name}' is not configured in {project} (remotes: {known}); "
                          f"add it with `dvc remote add` or start the local stack (`make stack`)")
    section = remotes[name]
    url = str(section["url"])
    parsed = urlparse(url)
    if parsed.scheme not in ("", "s3", "file") and len(parsed.scheme) > 1:
        raise RemoteError(f"DVC remote '{name}': only s3:// and local remotes are supported here, got {parsed.scheme}://")
    if parsed.scheme == "file":
        url = parsed.path
    return RemoteSpec(
        name=name,
        url=url,
        endpoint_url=section.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL"),
        region=section.get("region") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        access_key_id=section.get("access_key_id"),
        secret_access_key=section.get("secret_access_key"),
        session_token=section.get("session_token"),
    )


def credentials_from_block(block_name: str | None) -> dict[str, str] | None:
    """S3 credentials from a Prefect Secret block holding JSON
    `{"aws_access_key_id": ..., "aws_secret_access_key": ...}`; None when no block is named."""
    if not block_name:
        return None
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block_name).get()
    except ValueError as exc:
        raise RemoteError(f"Prefect Secret block '{block_name}' not found ({str(exc).splitlines()[0][:80]})") from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict) or not value.get("aws_access_key_id") or not value.get("aws_secret_access_key"):
        raise RemoteError(f"Prefect Secret block '{block_name}' must hold JSON with aws_access_key_id and "
                          f"aws_secret_access_key")
    return {k: str(v) for k, v in value.items() if k.startswith("aws_")}


# ----------------------------------------------------------------------------------------------- object access
def credentials_hint(spec: RemoteSpec) -> str:
    return (f"set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or `dvc remote modify --local {spec.name} "
            f"access_key_id ...` (and secret_access_key), or pass a Prefect Secret block")


def translate_remote_error(exc: BaseException, spec: RemoteSpec, what: str) -> RemoteError:
    """One line that says what failed on which remote and what to do; never contains credential values. The
    backend's exception is classified by the storage stack's one vocabulary (:func:`tasks.storage.translate_error`)."""
    err = exc if isinstance(exc, StorageError) else translate_error(what, exc)
    where = f"remote '{spec.name}' ({spec.url})"
    detail = str(err).removeprefix(f"{redact_url(what)}: ")
    if isinstance(err, CredentialsError):
        problem = "no S3 credentials" if detail.startswith("no S3 credentials") else "S3 rejected the credentials"
        return CredentialsRejected(f"{what}: {problem} for {where}: {credentials_hint(spec)}")
    if detail == "not found":
        return RemoteError(f"{what}: not found in {where}")
    if err.transient:
        return RemoteError(f"{what}: {where} unreachable ({detail})", transient=True)
    return RemoteError(f"{what}: {detail} ({where})")


class RemoteStore:
    """Objects of one remote through the project's storage stack (fsspec/s3fs, :class:`tasks.storage.Storage`),
    one filesystem (one connection pool) for all the reads and writes of one fetch or one run record."""

    def __init__(self, spec: RemoteSpec):
        self.spec = spec
        self._storage = Storage(s3_endpoint_url=spec.endpoint_url, s3_region=spec.region or "us-east-1",
                                s3_access_key_id=spec.access_key_id, s3_secret_access_key=spec.secret_access_key,
                                s3_session_token=spec.session_token)
        self._fs = self._storage.filesystem(spec.url)[0] if spec.is_s3 else None

    def read(self, key: str) -> bytes:
        url = self.spec.uri(key)
        try:
            if self._fs is None:
                return self._storage.read_bytes(url)
            with self._fs.open(f"{self.spec.bucket}/{key}", "rb") as fh:
                return fh.read()
        except Exception as exc:
            raise translate_remote_error(exc, self.spec, url) from None

    def write(self, key: str, data: bytes) -> str:
        """Write one object (local: write-then-rename; S3: one PUT when closed): readers see all of it or nothing.
        Returns its address."""
        url = self.spec.uri(key)
        try:
            if self._fs is None:
                self._storage.write_bytes(url, data)
            else:
                with self._fs.open(f"{self.spec.bucket}/{key}", "wb") as fh:
                    fh.write(data)
        except Exception as exc:
            raise translate_remote_error(exc, self.spec, url) from None
        return url


# ----------------------------------------------------------------------------------------------- dvc.yaml/lock
@dataclass(frozen=True)
class Output:
    stage: str
    path: str
    md5: str | None
    size: int | None
    nfiles: int | None
    cached: bool  # False for `cache: false` outputs (metrics): DVC never pushes those

    @property
    def is_dir(self) -> bool:
        return bool(self.md5 and self.md5.endswith(".dir"))


def _declared_cache_flags(dvc_yaml: dict) -> list[tuple[str, re.Pattern[str], bool, int]]:
    """(stage, path pattern, cached, literal length) of every declared output; a `${...}` part of a path
    (interpolated from params.yaml) matches any text, so the lock's resolved paths find their flags whatever the
    params were. A path matching several patterns takes the most literal one (`${reports}/metrics/x.json` over
    `${x.out}`)."""
    flags: list[tuple[str, re.Pattern[str], bool, int]] = []
    for stage, body in (dvc_yaml.get("stages") or {}).items():
        for kind in ("outs", "metrics", "plots"):
            for item in body.get(kind) or []:
                entries = {item: None} if isinstance(item, str) else item if isinstance(item, dict) else {}
                for path, opts in entries.items():
                    parts = re.split(r"\$\{[^}]+\}", str(path))
                    pattern = re.compile(".+".join(re.escape(part) for part in parts) + r"\Z")
                    flags.append((stage, pattern, bool((opts or {}).get("cache", True)), sum(map(len, parts))))
    return flags


def lock_outputs(lock_text: str, dvc_yaml_text: str | None = None) -> dict[str, list[Output]]:
    """Stage -> its outputs with hashes, from a dvc.lock (and dvc.yaml for the `cache:` flags)."""
    lock = yaml.safe_load(lock_text) or {}
    flags = _declared_cache_flags(yaml.safe_load(dvc_yaml_text) or {}) if dvc_yaml_text else []
    result: dict[str, list[Output]] = {}
    for stage, body in (lock.get("stages") or {}).items():
        outs = []
        for out in body.get("outs") or []:
            path = out["path"]
            declared = sorted(((-literal, i, cached) for i, (s, pattern, cached, literal) in enumerate(flags)
                               if s == stage and pattern.match(path)))
            cached = declared[0][2] if declared else not path.startswith("reports/metrics/")
            outs.append(Output(stage, path, out.get("md5"), out.get("size"), out.get("nfiles"), cached))
        result[stage] = outs
    return result


def project_outputs(project: str | Path) -> dict[str, list[Output]]:
    project = Path(project)
    lock = project / "dvc.lock"
    if not lock.exists():
        return {}
    dvc_yaml = project / "dvc.yaml"
    return lock_outputs(lock.read_text(), dvc_yaml.read_text() if dvc_yaml.exists() else None)


def git_show(project: str | Path, rev: str, path: str, binary: bool = False) -> str | bytes:
    """A file as it was at a git revision (bytes with ``binary``); RemoteError with git's reason otherwise."""
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=project, capture_output=True, check=False)
    if proc.returncode != 0:
        reason = (proc.stderr.decode(errors="replace").strip().splitlines() or ["git show failed"])[-1]
        raise RemoteError(f"{path} at revision '{rev}': {reason}")
    return proc.stdout if binary else proc.stdout.decode()


def md5_bytes(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()



def remote_urls(project: str | Path, paths: list[str], spec: RemoteSpec) -> dict[str, str | None]:
    """Where DVC keeps each tracked output's bytes in the remote, per the working tree's dvc.lock (what
    `dvc.api.get_url` answers, with one repository opened for all of them); None for what DVC does not track."""
    from dvc.repo import Repo

    urls: dict[str, str | None] = {}
    with Repo(str(project), remote=spec.name) as repo:
        for path in paths:
            try:
                index, entry = repo.get_data_index_entry(str(Path(project).resolve() / path))  # not cwd-relative
                fs, remote_path = index.storage_map.get_remote(entry)
                urls[path] = fs.unstrip_protocol(remote_path)
            except Exception:  # a link in a report is optional; DVC raises several kinds for "not tracked"
                urls[path] = None
    return urls


# ----------------------------------------------------------------------------------------------- push
class _FailedTransfers(logging.Handler):
    """Collects the exceptions DVC logs for the objects it failed to upload (it raises only a count)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain: DVC wraps the storage error (DataIndexDirError from FileNotFoundError,
    ...), and the root says what to do."""
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def push_outputs(project: str | Path, spec: RemoteSpec) -> int:
    """`dvc push` through DVC's Python API; returns the number of objects uploaded. Failures are classified from
    the exceptions themselves (the one raised, or those DVC logged for failed uploads), never from printed text:
    credentials -> :class:`CredentialsRejected`; a missing bucket -> final; anything else (network, throttling, a
    store that went away half-way) -> transient, since a retry uploads only what is missing."""
    from dvc.exceptions import UploadError
    from dvc.repo import Repo

    where = f"dvc push to remote '{spec.name}' ({spec.url})"
    failed = _FailedTransfers()
    loggers = [logging.getLogger(name) for name in ("dvc", "dvc_data", "dvc_objects")]  # who logs a failed upload
    for logger in loggers:
        logger.addHandler(failed)
    try:
        with Repo(str(project), remote=spec.name, remote_config=spec.dvc_credentials() or None) as repo:
            return int(repo.push(remote=spec.name))
    except Exception as exc:
        causes = failed.errors if isinstance(exc, UploadError) and failed.errors else [exc]
        roots = [root_cause(c) for c in causes]
        errs = [translate_error(spec.url, r) for r in roots]
        if any(isinstance(e, CredentialsError) for e in errs):
            raise CredentialsRejected(f"{where}: S3 rejected the credentials or found none: "
                                      f"{credentials_hint(spec)}") from None
        if isinstance(roots[0], FileNotFoundError) and spec.is_s3 and not isinstance(exc, UploadError):
            raise RemoteError(f"{where}: the bucket '{spec.bucket}' does not exist") from None
        detail = str(errs[0]).removeprefix(f"{redact_url(spec.url)}: ")
        raise RemoteError(f"{where} failed ({len(causes)} error(s), first: {detail[:200]}); a retry uploads only "
                          f"what is missing", transient=True) from None
    finally:
        for logger in loggers:
            logger.removeHandler(failed)
