"""Read access to the content-addressed image store that `ingest` writes (manifest.parquet + images/)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


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


def load_indexed_images(index_csv: str | Path, path_column: str, id_column: str) -> tuple[list[str], list[Path]]:
    """(ids, absolute paths) of an image set described by a CSV whose paths are relative to the CSV's folder."""
    index_csv = Path(index_csv)
    if not index_csv.exists():
        raise FileNotFoundError(f"{index_csv} not found")
    frame = pd.read_csv(index_csv)
    for col in (path_column, id_column):
        if col not in frame.columns:
            raise ValueError(f"{index_csv}: no '{col}' column (columns: {list(frame.columns)})")
    return frame[id_column].astype(str).tolist(), [index_csv.parent / p for p in frame[path_column]]


def open_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")
