"""One storage abstraction for every stage: local paths, `file://`, `http(s)://` and `s3://` through fsspec.

Stages never branch on the URL scheme themselves; they call `read_bytes`, `open_write`, `put_file`...
S3 endpoint/region come from params (`storage`), credentials only from the environment (never params, never logs).
"""

from __future__ import annotations

import base64
import errno
import fnmatch
import http.client
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlparse, urlsplit, urlunsplit

import fsspec

from dinov2_core.atomic import atomic_write_bytes
from tasks.sections import StorageParams


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
    try:
        parsed = urlparse(url)
    except ValueError:  # e.g. an unbalanced '[' in the host: not a URL we can fetch
        return "invalid"
    if len(parsed.scheme) <= 1:  # '' or a Windows drive letter
        return "local"
    return parsed.scheme.lower()


# Query keys whose values are secrets in signed or tokenised URLs (AWS/GCS/Azure signatures, API keys, tokens).
_SECRET_KEY = re.compile(r"sig|signature|token|key|credential|secret|passw|auth|session", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` safe for logs, tables, metrics and shards: no userinfo, no signature/token/key query values.

    Crawl rows come from the web and S3 lists may hold pre-signed URLs; a message that names a row must not
    leak what signs it. Anything that does not parse as a URL is returned unchanged (it carries no query)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if len(parts.scheme) <= 1:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(_SECRET_KEY.search(k) for k, _ in pairs):
        query = urlencode([(k, "REDACTED" if _SECRET_KEY.search(k) else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _basic_auth(url: str) -> tuple[str, None, dict[str, str]]:
    """(url without userinfo, no body, headers): `user:password@` in a crawl URL becomes HTTP Basic auth
    (urllib would otherwise take it for part of the host name)."""

    headers = {"User-Agent": "dinov2-pipeline-ingest/0.1"}
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, headers
    userinfo, host = parts.netloc.rsplit("@", 1)
    token = base64.b64encode(unquote(userinfo).encode()).decode()
    headers["Authorization"] = f"Basic {token}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), None, headers


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow at most `max_redirections` redirects, and only to http(s): a crawl URL must not be able to
    bounce the fetcher to ftp:// or file:// (urllib's default allows ftp and 10 hops)."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urlsplit(newurl).scheme.lower()
        if scheme and scheme not in ("http", "https"):
            raise StorageError(f"{redact_url(req.full_url)}: redirect to a {scheme}:// URL refused")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_HTTP_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)
_PERMANENT_DNS = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}


@dataclass(frozen=True)
class Storage:
    """Stateless handle that knows how to reach S3 (endpoint, region) and how long to wait for HTTP."""

    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    http_timeout_s: float = 10.0  # bounds every connect and every read
    http_deadline_s: float = 120.0  # bounds a whole response (a server dripping a byte per second)
    # explicit S3 keys (a DVC remote's `--local` settings or a Prefect Secret block); None: the AWS chain (env,
    # profile, instance role). Never shown: repr=False.
    s3_access_key_id: str | None = field(default=None, repr=False)
    s3_secret_access_key: str | None = field(default=None, repr=False)
    s3_session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_params(cls, params: StorageParams, http_timeout_s: float = 10.0,
                    http_deadline_s: float = 120.0) -> Storage:
        return cls(params.s3_endpoint_url, params.s3_region, http_timeout_s, http_deadline_s)

    # -- filesystem construction -------------------------------------------------------------------------
    def _options(self, scheme: str) -> dict[str, Any]:
        if scheme == "s3":
            endpoint = self.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
            client_kwargs: dict[str, Any] = {"region_name": self.s3_region}
            if endpoint:
                client_kwargs["endpoint_url"] = endpoint
            options: dict[str, Any] = {
                "client_kwargs": client_kwargs,
                "config_kwargs": {"connect_timeout": 5, "read_timeout": 30, "retries": {"max_attempts": 3}},
                "skip_instance_cache": True,
            }
            if self.s3_access_key_id and self.s3_secret_access_key:
                options.update(key=self.s3_access_key_id, secret=self.s3_secret_access_key,
                               token=self.s3_session_token)
            return options
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
        """GET streamed in chunks: refused past `max_bytes` while reading (never read whole, then checked),
        every read bounded by the timeout and the whole body by the deadline; redirects bounded, http(s) only.
        (fsspec's HTTP layer reports refused connections as 'not found', hiding faults that deserve a retry.)"""
        shown = redact_url(url)
        request = urllib.request.Request(*_basic_auth(url))
        deadline = time.monotonic() + self.http_deadline_s
        chunks: list[bytes] = []
        try:
            with _HTTP_OPENER.open(request, timeout=self.http_timeout_s) as resp:
                length = resp.headers.get("Content-Length")
                if max_bytes is not None and length and length.isdigit() and int(length) > max_bytes:
                    raise TooLargeError(f"{shown}: Content-Length {length} above the {max_bytes}-byte limit")
                total = 0
                while chunk := resp.read1(1 << 16):  # read1: returns what arrived, so the deadline is checked
                    total += len(chunk)
                    if max_bytes is not None and total > max_bytes:
                        raise TooLargeError(f"{shown}: larger than the {max_bytes}-byte limit")
                    if time.monotonic() > deadline:
                        raise StorageError(f"{shown}: network error (response slower than the "
                                           f"{self.http_deadline_s:g} s deadline)", transient=True)
                    chunks.append(chunk)
        except StorageError:
            raise
        except urllib.error.HTTPError as exc:
            raise StorageError(f"{shown}: HTTP {exc.code}", transient=exc.code >= 500 or exc.code == 429) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise StorageError(f"{shown}: TLS certificate rejected ({reason.verify_message})") from None
            if isinstance(reason, socket.gaierror) and reason.errno in _PERMANENT_DNS:
                raise StorageError(f"{shown}: unknown host") from None
            raise StorageError(f"{shown}: network error ({_one_line(reason)})", transient=True) from None
        except (TimeoutError, ConnectionError, http.client.IncompleteRead, OSError) as exc:
            raise StorageError(f"{shown}: network error ({type(exc).__name__})", transient=True) from None
        except (http.client.HTTPException, ValueError) as exc:  # garbage status line, invalid URL for http.client
            raise StorageError(f"{shown}: bad HTTP exchange ({type(exc).__name__}: {_one_line(exc)})") from None
        return b"".join(chunks)

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

        fs, path = self.filesystem(url_prefix)
        try:
            names = fs.ls(path, detail=False) if fs.exists(path) else []
        except Exception as exc:
            raise translate_error(url_prefix, exc) from None
        base = url_prefix.rstrip("/")
        return sorted(f"{base}/{n.rsplit('/', 1)[-1]}" for n in names if fnmatch.fnmatch(n.rsplit("/", 1)[-1], pattern))

    def find(self, url_prefix: str) -> list[str]:
        """URLs of every object under a folder/prefix, at any depth, sorted."""
        fs, path = self.filesystem(url_prefix)
        try:
            found = fs.find(path)
        except Exception as exc:
            raise translate_error(url_prefix, exc) from None
        scheme = scheme_of(url_prefix)
        return sorted(p if scheme == "local" else f"{scheme}://{p}" for p in found)

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


def _one_line(exc: object) -> str:
    text = str(exc)
    return text.splitlines()[0][:160] if text.strip() else type(exc).__name__


def translate_error(url: str, exc: BaseException) -> StorageError:
    """Map fsspec/aiohttp/botocore exceptions to a one-line StorageError that says what to do."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc).strip() else name
    url = redact_url(url)
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return CredentialsError(
            f"{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    cause = exc.__cause__  # s3fs raises Python errors (PermissionError, OSError(EBUSY)...) from botocore's ClientError
    cause_code = str((getattr(cause, "response", None) or {}).get("Error", {}).get("Code", ""))
    if (any(code in text for code in _S3_CREDENTIAL_CODES) or cause_code in _S3_CREDENTIAL_CODES + _S3_DENIED_CODES
            or name == "ClientError" and "403" in text):
        code = cause_code or next((c for c in _S3_CREDENTIAL_CODES if c in text), "403")
        return CredentialsError(f"{url}: S3 rejected the credentials ({code}); check AWS_* variables")
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
    if (any(code in text for code in _S3_TRANSIENT_CODES) or cause_code in _S3_TRANSIENT_CODES
            or getattr(exc, "errno", None) in (errno.EBUSY, errno.EAGAIN)):
        return StorageError(f"{url}: network error ({cause_code or name}: {text[:120]})", transient=True)
    return StorageError(f"{url}: {name}: {text[:160]}")


# S3 error codes that mean the keys are missing, unknown or do not sign: a configuration problem, never retried.
_S3_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                        "AuthorizationHeaderMalformed")
# What S3 answers a HEAD (no body: bare status) or a request the keys may not make; s3fs raises PermissionError.
_S3_DENIED_CODES = ("403", "Forbidden", "AccessDenied")
# S3 error codes that mean "the service is busy or failing", worth a retry with back-off.
_S3_TRANSIENT_CODES = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                       "(503)", "(500)", "(502)", "(504)")
