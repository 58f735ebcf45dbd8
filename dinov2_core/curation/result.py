"""Return type of the curation algorithms: the per-image frame and the run's metrics, side by side."""

from __future__ import annotations

from typing import Any, NamedTuple

import pandas as pd

__all__ = ["CurationResult"]


class CurationResult(NamedTuple):
    """Metrics are returned, not hidden in df.attrs, which pandas drops on copy/concat and puts in parquet."""

    frame: pd.DataFrame
    metrics: dict[str, Any]
