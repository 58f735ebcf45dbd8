"""Great-expectations 1.x checks at every stage boundary.

A stage hands its output tables and a list of expectations per table to `validate_stage`; the results go to
`reports/validation/<stage>.json` and the first failed expectation becomes a one-line `DataQualityError`, which
the CLI prints and turns into a non-zero exit (so DVC and Prefect stop there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.reports import write_json

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# Test-only fault injection, for checks of what the flow does when data breaks a contract: "<stage>.<table>"
# corrupts that table's first row (booleans flipped, numbers -1, text garbled) before the real validation runs.
FAULT_ENV = "DINOV2_FAULT_GX"


class DataQualityError(RuntimeError):
    """A stage's output broke its contract; the message names the expectation that failed."""


@dataclass
class TableCheck:
    """One table and the expectations it must meet (great_expectations.expectations.* instances)."""

    name: str
    frame: pd.DataFrame
    expectations: list[Any] = field(default_factory=list)


def _describe(result: Any) -> str:
    cfg = result.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",)}
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()))
    detail = result.result or {}
    if "unexpected_count" in detail and detail.get("unexpected_count"):
        sample = detail.get("partial_unexpected_list") or []
        eg = f" (e.g. {sample[0]!r})" if sample else ""
        what = f"{detail['unexpected_count']} unexpected value(s){eg}"
    elif "observed_value" in detail:
        what = f"observed {detail['observed_value']!r}"
    else:
        what = "failed"
    return f"{cfg.type}({args}): {what}"


def _injected_fault(frame: pd.DataFrame) -> pd.DataFrame:
    if not len(frame):
        return frame
    frame = frame.copy()
    for col in frame.columns:
        values = frame[col].astype(object).tolist()
        if pd.api.types.is_bool_dtype(frame[col]):
            values[0] = not values[0]
        elif pd.api.types.is_numeric_dtype(frame[col]):
            values[0] = -1
        else:
            values[0] = "corrupt"
        frame[col] = pd.Series(values, index=frame.index, dtype=frame[col].dtype if values[0] != "corrupt" else object)
    return frame


def validate_stage(stage: str, checks: list[TableCheck], reports_dir: str | Path) -> dict[str, Any]:
    """Run every table's suite; write the JSON report; raise DataQualityError on the first failure."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas(f"{stage}-outputs")
    report: dict[str, Any] = {"stage": stage, "success": True, "tables": {}}
    failures: list[str] = []
    for check in checks:
        frame = _injected_fault(check.frame) if os.environ.get(FAULT_ENV) == f"{stage}.{check.name}" else check.frame
        asset = source.add_dataframe_asset(check.name)
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(batch_parameters={"dataframe": frame})
        suite = gx.ExpectationSuite(name=f"{stage}.{check.name}")
        for expectation in check.expectations:
            suite.add_expectation(expectation)
        result = batch.validate(suite)
        table = {"success": bool(result.success), "rows": len(check.frame), "expectations": []}
        for item in result.results:
            table["expectations"].append(
                {
                    "type": item.expectation_config.type,
                    "kwargs": {k: v for k, v in item.expectation_config.kwargs.items() if k != "batch_id"},
                    "success": bool(item.success),
                    "result": {
                        k: v
                        for k, v in (item.result or {}).items()
                        if k in ("observed_value", "unexpected_count", "unexpected_percent", "partial_unexpected_list")
                    },
                }
            )
            if not item.success:
                failures.append(f"{check.name}: {_describe(item)}")
        report["tables"][check.name] = table
        report["success"] = report["success"] and table["success"]
    report["failures"] = failures
    write_json(Path(reports_dir) / "validation" / f"{stage}.json", report)
    if failures:
        more = f" (+{len(failures) - 1} more in reports/validation/{stage}.json)" if len(failures) > 1 else ""
        raise DataQualityError(f"{stage}: data-quality check failed: {failures[0]}{more}")
    return report
