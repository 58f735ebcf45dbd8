"""What a crawl row may point at, decided before anything is fetched.

A crawl list comes from the web: a cell may hold any text. Only four kinds of source are ever read: a local
path (relative to the manifest's folder), `file://` without a host, `http(s)://` with a host, and
`s3://bucket/key`. Everything else is refused here with its own reason code, so no other fsspec protocol (ftp,
ssh, gcs, memory, zip chains, ...) can be reached from a crawl row and nothing touches the network for it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tasks.storage import redact_url

FETCHED_SCHEMES = ("local", "file", "http", "https", "s3")
REMOTE_SCHEMES = ("http", "https", "s3")


class SourceRejected(Exception):
    """A row refused before fetching; `reason` is a quarantine reason code, `message` one safe line."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Source:
    scheme: str  # one of FETCHED_SCHEMES
    target: str  # what Storage reads: an absolute local path, or the URL itself
    shown: str  # the row's text with credentials and signatures redacted: safe for logs, tables and shards

    @property
    def remote(self) -> bool:
        return self.scheme in REMOTE_SCHEMES


def shown_cell(cell: object, limit: int = 300) -> str:
    """A crawl cell as it may appear in outputs: redacted, control characters escaped, bounded length."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return ""
    text = redact_url(str(cell))
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_source(cell: object, root: Path, allow_outside_root: bool, max_length: int) -> Source:
    """The source a crawl cell names, or SourceRejected (empty_url, bad_url, unsupported_scheme, unsafe_path)."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        raise SourceRejected("empty_url", "the url cell is empty")
    if not isinstance(cell, str):
        raise SourceRejected("bad_url", f"the url cell holds a {type(cell).__name__}, not text")
    text = cell.strip()
    if not text:
        raise SourceRejected("empty_url", "the url cell is blank")
    if len(text) > max_length:
        raise SourceRejected("bad_url", f"{len(text)} characters, above ingest.max_url_length ({max_length})")
    if any(not c.isprintable() for c in text):
        raise SourceRejected("bad_url", "control or non-printable character (NUL, newline, ...) in the url")
    shown = shown_cell(text)
    try:
        parts = urlsplit(text)
    except ValueError as exc:
        raise SourceRejected("bad_url", f"{shown}: malformed url ({exc})") from None
    scheme = parts.scheme.lower() if len(parts.scheme) > 1 else "local"  # 1 letter: a Windows drive
    if scheme not in FETCHED_SCHEMES:
        raise SourceRejected("unsupported_scheme", f"{shown}: '{scheme}://' is not fetched (only local paths, "
                                                   "file://, http(s):// and s3://)")
    try:
        port = parts.port  # validates the port number
    except ValueError as exc:
        raise SourceRejected("bad_url", f"{shown}: malformed url ({exc})") from None
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise SourceRejected("bad_url", f"{shown}: no host")
        if not _valid_host(parts.hostname):
            raise SourceRejected("bad_url", f"{shown}: not a host name or IP address")
        if port == 0:
            raise SourceRejected("bad_url", f"{shown}: port 0")
        return Source(scheme, text, shown)
    if scheme == "s3":
        if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc or not parts.path.strip("/"):
            raise SourceRejected("bad_url", f"{shown}: an s3 url is s3://bucket/key")
        return Source(scheme, text, shown)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise SourceRejected("bad_url", f"{shown}: a file:// url naming a host ({parts.hostname or parts.netloc})"
                                            " is not read; only this machine's files are")
        raw = unquote(parts.path)
        if not raw or "\x00" in raw:
            raise SourceRejected("bad_url", f"{shown}: no usable path")
    else:
        raw = text
    return Source(scheme, _local_target(raw, text, shown, root, allow_outside_root), shown)


_HOST = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62}\.?)*$|^[0-9a-f:.]+$")


def _valid_host(host: str) -> bool:
    """A DNS name (IDN allowed) or an IP literal: garbage never reaches a resolver."""
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return False
    return bool(_HOST.match(ascii_host))


def _local_target(raw: str, text: str, shown: str, root: Path, allow_outside_root: bool) -> str:
    """Local paths are relative to the manifest's folder and, unless allowed, must stay inside it."""
    path = Path(raw)
    try:
        full = (path if path.is_absolute() else root / path).resolve()
    except (OSError, RuntimeError) as exc:  # name too long, symlink loop
        raise SourceRejected("bad_url", f"{shown}: unusable path ({type(exc).__name__})") from None
    if not allow_outside_root and not full.is_relative_to(root.resolve()):
        raise SourceRejected("unsafe_path", f"{shown} resolves outside the crawl root {root}")
    return str(full)
