"""What `make run` prints at the end: where the results are, and the evaluation summary.

The eval stage writes `reports/eval_summary.md` (preferred) and `reports/metrics/eval.json`; until it exists the
headline metrics of whatever stages did run are shown instead, so the command is useful at every stage of the
project's growth.
"""

from __future__ import annotations

import json
from pathlib import Path

from flows.artifacts import headline_metrics
from flows.remote import project_outputs
from tasks.stages import STAGES


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for key, value in data.items():
        if key == "params":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += _flatten(value, f"{name}.")
        elif isinstance(value, (int, float, str, bool)) or value is None:
            rows.append((name, value))
    return rows


def eval_summary(reports: Path) -> str:
    summary_md = reports / "eval_summary.md"
    if summary_md.exists():
        return summary_md.read_text().rstrip()
    eval_json = reports / "metrics" / "eval.json"
    if eval_json.exists():
        try:
            rows = _flatten(json.loads(eval_json.read_text()))
        except (OSError, json.JSONDecodeError):
            rows = []
        body = "\n".join(f"  {k:<48} {v:.4g}" if isinstance(v, float) else f"  {k:<48} {v}" for k, v in rows[:60])
        return f"Evaluation ({eval_json}):\n{body}"
    lines = ["The eval stage has not produced reports/eval_summary.md yet; headline metrics per stage:"]
    for stage in STAGES:
        head = headline_metrics(reports / "metrics" / f"{stage}.json", limit=6)
        if head:
            lines.append(f"  {stage:<14} {head}")
    return "\n".join(lines)


def results_report(project: str | Path, reports: str | Path = "reports", result: dict | None = None) -> str:
    project = Path(project).resolve()
    reports = Path(reports)
    reports = reports if reports.is_absolute() else project / reports
    outs = project_outputs(project)
    lines = ["", "Results", "-------"]
    for stage in STAGES:
        for out in outs.get(stage, []):
            if out.cached:
                lines.append(f"  {stage:<14} {project / out.path}")
    lines += [f"  {'metrics':<14} {reports / 'metrics'}/*.json   (`dvc metrics show`)",
              f"  {'data quality':<14} {reports / 'validation'}/*.json"]
    push = (result or {}).get("push")
    if push:
        lines.append(f"  {'remote':<14} {push['url']}  ({push['pushed']} new object(s) pushed to '{push['remote']}')")
    if (result or {}).get("run_record"):
        lines.append(f"  {'run record':<14} {result['run_record']}   "
                     f"(`dinov2-pipeline fetch PATH --run {result['run_id']}`)")
    if (result or {}).get("experiment"):
        name = result["experiment"].rsplit("/", 1)[-1]
        lines.append(f"  {'experiment':<14} {name}   (`dvc exp show`, `dvc plots diff {name} <other run>`)")
    lines += ["", eval_summary(reports)]
    return "\n".join(lines)
