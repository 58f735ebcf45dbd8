"""One storage abstraction for every stage: local paths, `file://`, `http(s)://` and `s3://` through fsspec.

Stages never branch on the URL scheme themselves; they call `read_bytes`, `open_write`, `put_file`...
S3 endpoint/region come from params (`storage`), credentials only from the environment (never params, never logs).
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import fsspec

from tasks.params import StorageParams


class StorageError(RuntimeError):
    """A read/write failed for a reason the user can act on; `transient` says whether a retry may help."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class TooLargeError(StorageError):
    """The object exceeded the byte limit; raised while streaming, before it is all in memory."""


class CredentialsError(StorageError):
    """S3 credentials are missing or rejected: fatal for a whole stage, not a per-file problem."""


def scheme_of(url: str) -> str:
    parsed = urlparse(url)
    if len(parsed.scheme) <= 1:  # '' or a Windows drive letter
        return "local"
    return parsed.scheme.lower()


@dataclass(frozen=True)
class Storage:
    """Stateless handle that knows how to reach S3 (endpoint, region) and how long to wait for HTTP."""

    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    http_timeout_s: float = 10.0

    @classmethod
    def from_params(cls, params: StorageParams, http_timeout_s: float = 10.0) -> Storage:
        return cls(params.s3_endpoint_url, params.s3_region, http_timeout_s)

    # -- filesystem construction -------------------------------------------------------------------------
    def _options(self, scheme: str) -> dict[str, Any]:
        if scheme == "s3":
            endpoint = self.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
            client_kwargs: dict[str, Any] = {"region_name": self.s3_region}
            if endpoint:
                client_kwargs["endpoint_url"] = endpoint
            return {
                "client_kwargs": client_kwargs,
                "config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 3}},
                "skip_instance_cache": True,
            }
        return {}

    def fsspec_options(self, url: str) -> dict[str, Any]:
        """The options this storage opens `url` with, for libraries that take fsspec options (e.g. DCP)."""
        return self._options(scheme_of(url))

    def filesystem(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        scheme = scheme_of(url)
        if scheme == "local":
            return fsspec.filesystem("file"), str(Path(url))
        fs, path = fsspec.core.url_to_fs(url, **self._options(scheme))
        return fs, path

    # -- reads --------------------------------------------------------------------------------------------
    def read_bytes(self, url: str, max_bytes: int | None = None) -> bytes:
        """Whole object as bytes, refusing (TooLargeError) anything bigger than `max_bytes` while streaming."""
        if scheme_of(url) in ("http", "https"):
            return self._read_http(url, max_bytes)
        fs, path = self.filesystem(url)
        try:
            with fs.open(path, "rb") as fh:
                if max_bytes is None:
                    return fh.read()
                data = fh.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise TooLargeError(f"{url}: larger than the {max_bytes}-byte limit")
                return data
        except StorageError:
            raise
        except Exception as exc:  # translate the many backend exceptions into one vocabulary
            raise translate_error(url, exc) from None

    def _read_http(self, url: str, max_bytes: int | None) -> bytes:
        """Plain GET with a timeout: fsspec's HTTP layer reports refused connections as 'not found',
        which would hide the transient faults that deserve a retry."""
        request = urllib.request.Request(url, headers={"User-Agent": "dinov2-pipeline-ingest/0.1"})
        try:
            with urllib.request.urlopen(request, timeout=self.http_timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
                    raise TooLargeError(f"{url}: Content-Length {length} above the {max_bytes}-byte limit")
                data = resp.read() if max_bytes is None else resp.read(max_bytes + 1)
        except StorageError:
            raise
        except urllib.error.HTTPError as exc:
            raise StorageError(f"{url}: HTTP {exc.code}", transient=exc.code >= 500 or exc.code == 429) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StorageError(f"{url}: network error ({reason})", transient=True) from None
        if max_bytes is not None and len(data) > max_bytes:
            raise TooLargeError(f"{url}: larger than the {max_bytes}-byte limit")
        return data

    def read_bytes_with_retries(self, url: str, max_bytes: int | None, retries: int, backoff_s: float) -> bytes:
        """Bounded retries with exponential back-off, only for faults a retry can fix (network, 5xx)."""
        attempt = 0
        while True:
            try:
                return self.read_bytes(url, max_bytes)
            except StorageError as exc:
                if not exc.transient or attempt >= retries:
                    raise
                time.sleep(backoff_s * (2**attempt))
                attempt += 1

    def exists(self, url: str) -> bool:
        fs, path = self.filesystem(url)
        try:
            return fs.exists(path)
        except Exception as exc:
            raise translate_error(url, exc) from None

    # -- writes -------------------------------------------------------------------------------------------
    def open_write(self, url: str) -> IO[bytes]:
        """A binary writer; local files are created with parents. S3 objects appear only when closed."""
        fs, path = self.filesystem(url)
        if scheme_of(url) == "local":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            return fs.open(path, "wb")
        except Exception as exc:
            raise translate_error(url, exc) from None

    def write_bytes(self, url: str, data: bytes) -> None:
        if scheme_of(url) == "local":
            atomic_write_bytes(Path(url), data)
            return
        with self.open_write(url) as fh:
            fh.write(data)


    def open_read(self, url: str) -> IO[bytes]:
        """A binary reader (streams; S3 objects are fetched in blocks)."""
        fs, path = self.filesystem(url)
        try:
            return fs.open(path, "rb")
        except Exception as exc:
            raise translate_error(url, exc) from None

    def put_file(self, local: str | Path, url: str) -> None:
        """Copy a finished local file to `url` (rename when local, so readers never see half a file)."""
        if scheme_of(url) == "local":
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, url)
            return
        fs, path = self.filesystem(url)
        try:
            fs.put_file(str(local), path)
        except Exception as exc:
            raise translate_error(url, exc) from None

    def list(self, url_prefix: str, pattern: str = "*") -> list[str]:
        """URLs of the objects directly under a folder/prefix whose names match `pattern`, sorted."""
        import fnmatch

        fs, path = self.filesystem(url_prefix)
        try:
            names = fs.ls(path, detail=False) if fs.exists(path) else []
        except Exception as exc:
            raise translate_error(url_prefix, exc) from None
        base = url_prefix.rstrip("/")
        return sorted(f"{base}/{n.rsplit('/', 1)[-1]}" for n in names if fnmatch.fnmatch(n.rsplit("/", 1)[-1], pattern))

    def delete(self, url: str) -> None:
        fs, path = self.filesystem(url)
        try:
            fs.rm(path)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise translate_error(url, exc) from None


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a local folder or a URL prefix."""
    if scheme_of(base) == "local":
        return str(Path(base, *parts))
    return "/".join([base.rstrip("/"), *parts])


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a killed process never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would make outputs private to this user
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def translate_error(url: str, exc: BaseException) -> StorageError:
    """Map fsspec/aiohttp/botocore exceptions to a one-line StorageError that says what to do."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else name
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return CredentialsError(
            f"{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    if "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text or name == "ClientError" and "403" in text:
        return CredentialsError(f"{url}: S3 rejected the credentials ({text[:120]}); check AWS_* variables")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{url}: not found")
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{url}: is a directory, not a file")
    if isinstance(exc, PermissionError):
        return StorageError(f"{url}: permission denied")
    transient_names = (
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
        "TimeoutError",
        "ConnectTimeoutError",
        "EndpointConnectionError",
        "ReadTimeoutError",
        "ConnectionError",
        "ConnectionRefusedError",
        "ServerTimeoutError",
    )
    if name in transient_names or isinstance(exc, (TimeoutError, ConnectionError)):
        return StorageError(f"{url}: network error ({name}: {text[:120]})", transient=True)
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return StorageError(f"{url}: HTTP {status}", transient=status >= 500 or status == 429)
    return StorageError(f"{url}: {name}: {text[:160]}")
