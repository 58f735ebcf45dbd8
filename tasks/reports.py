"""Metrics and plot files every stage writes (DVC `metrics:`/`plots:`), with stable formatting."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from dinov2_core.atomic import atomic_path, atomic_write_bytes


def _clean(value: Any) -> Any:
    """JSON-safe values: numpy scalars to Python, NaN/inf to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(_clean(payload), indent=2, sort_keys=True) + "\n").encode())
    return path


def write_metrics(reports_dir: str | Path, stage: str, payload: dict[str, Any]) -> Path:
    """`reports/metrics/<stage>.json`: the numbers DVC shows with `dvc metrics show`."""
    return write_json(Path(reports_dir) / "metrics" / f"{stage}.json", payload)


def write_plot_csv(reports_dir: str | Path, name: str, frame: pd.DataFrame) -> Path:
    """`reports/plots/<name>.csv`: a table DVC renders with `dvc plots show`."""
    path = Path(reports_dir) / "plots" / f"{name}.csv"
    atomic_write_bytes(path, frame.to_csv(index=False).encode())
    return path


def write_parquet(path: str | Path, frame: pd.DataFrame) -> Path:
    """Deterministic Parquet (no index, fixed compression) so reruns give byte-identical files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = frame.reset_index(drop=True)
    frame.attrs = {}  # pandas stores attrs (e.g. timings) in the file metadata: bytes would differ per run
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False, compression="zstd", engine="pyarrow")
    return path
