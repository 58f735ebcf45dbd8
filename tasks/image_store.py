"""Read access to the content-addressed image store that `ingest` writes (manifest.parquet + images/)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from tasks.tables import read_user_table


class ImageStore:
    """Images by sha256 key, decoded to RGB; the manifest gives sizes and provenance."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        manifest = self.root / "manifest.parquet"
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest} not found: run the ingest stage first (or set the images path)")

    @cached_property
    def manifest(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / "manifest.parquet").set_index("sha256", drop=False)

    def path(self, key: str) -> Path:
        return self.root / self.manifest.at[key, "path"]

    def load(self, key: str) -> Image.Image:
        with Image.open(self.path(key)) as img:
            return img.convert("RGB")

    def resolution(self, keys: list[str]) -> np.ndarray:
        m = self.manifest.loc[keys]
        return (m["width"].to_numpy(np.int64) * m["height"].to_numpy(np.int64)).astype(np.float64)


def load_indexed_images(index_csv: str | Path, path_column: str, id_column: str,
                        what: str = "image index") -> tuple[list[str], list[Path]]:
    """(ids, absolute paths) of an image set described by a CSV whose paths are relative to the CSV's folder.
    Every listed image must exist: a missing one is named here, not as a bare errno when it is first opened."""
    index_csv = Path(index_csv)
    frame = read_user_table(index_csv, what, (path_column, id_column))
    paths = [index_csv.parent / p for p in frame[path_column]]
    missing = [str(rel) for rel, p in zip(frame[path_column], paths) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what} {index_csv}: {len(missing)} of {len(paths)} listed images are missing, "
                                f"e.g. {missing[0]!r} (paths are relative to the index's folder)")
    return frame[id_column].astype(str).tolist(), paths


def open_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")
