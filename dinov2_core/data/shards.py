"""Reading WebDataset tar shards from anywhere: the caller passes `opener(url) -> binary stream`.

The library never imports an S3 client; tasks pass an opener built on the project's storage abstraction,
researchers can pass `open` or `fsspec.open`. Tar parsing and sample grouping are webdataset's own.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from webdataset.tariterators import group_by_keys, tar_file_expander

Opener = Callable[[str], IO[bytes]]


def _opened(urls: Iterable[str], opener: Opener) -> Iterator[dict[str, Any]]:
    for url in urls:
        stream = opener(url)
        try:
            yield {"url": url, "stream": stream}
        finally:
            stream.close()


def _open_local(url: str) -> IO[bytes]:
    return open(url, "rb")


def iter_shard_samples(urls: Iterable[str], opener: Opener = _open_local) -> Iterator[dict[str, Any]]:
    """Samples as dicts: `__key__`, `__url__` and one bytes entry per member extension (e.g. `jpg`, `json`).

    A shard that is no readable tar (truncated by a copy, damaged) is a ValueError naming it in one line; tarfile's
    ReadError names no shard and is no ValueError/OSError, so training ranks reported it with a full traceback."""
    for url in urls:  # one at a time: a sample never spans two shards, and the error can name its shard
        try:
            yield from group_by_keys(tar_file_expander(_opened([url], opener)))
        except tarfile.TarError as exc:
            why = str(exc.args[0] if exc.args else exc).split(" @ ")[0]
            raise ValueError(f"{url}: not a readable tar shard ({why}): truncated or damaged after it was written; "
                             "write the shards again (`dvc repro shards`) or fetch it again") from exc
