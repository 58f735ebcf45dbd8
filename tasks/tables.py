"""The tables a user hands the pipeline (crawl manifests, seed and evaluation indexes), read with one-line errors
that name the file and what it should be, instead of pandas' or Arrow's bare parser messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


def read_user_table(path: str | Path, what: str, columns: tuple[str, ...] = (), **read_csv: Any) -> pd.DataFrame:
    """A CSV (or ``.parquet``) table with at least `columns`; `what` names it in errors ("crawl manifest")."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, **read_csv)
    except ValueError as exc:  # pandas' parser errors, UnicodeDecodeError and Arrow's ArrowInvalid all are
        kind = "Parquet" if path.suffix == ".parquet" else "UTF-8 CSV (a header row naming the columns, then a row each)"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"{what} {path}: not a readable {kind}: {type(exc).__name__}: {first[:160]}") from None
    for column in columns:
        if column not in frame.columns:
            raise ValueError(f"{what} {path}: no '{column}' column (columns: {list(frame.columns)})")
    return frame
