"""What the Prefect UI shows for each stage and run: Markdown tables built from the files stages write.

Pure rendering (`*_markdown`) is separate from publishing (`publish`), so the tables are testable without a
Prefect server and the flow never fails because an artifact could not be created.
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from flows.remote import Output, RemoteSpec


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def _cell(value: Any, limit: int = 120) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = "`" + json.dumps(value, sort_keys=True)[: limit - 2] + "`"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")[:limit]


def validation_files(reports: Path, stage: str, other_stages: set[str] | frozenset[str] = frozenset()) -> list[Path]:
    """`<stage>.json` plus any `<stage>-<boundary>.json` (e.g. `shards-input.json`) a stage wrote,
    but not another stage's file that merely shares the prefix."""
    folder = reports / "validation"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{stage}*.json")
                  if p.stem == stage or (p.stem.startswith(f"{stage}-") and p.stem not in other_stages))


def validation_markdown(stage: str, files: list[Path]) -> str | None:
    """One row per expectation: table, expectation, pass/fail, what was observed."""
    if not files:
        return None
    lines = [f"### {stage}: data-quality (great-expectations)", ""]
    for path in files:
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        verdict = "passed" if report.get("success") else "**FAILED**"
        lines += [f"**{path.stem}**: {verdict}", "",
                  "| table | rows | expectation | result | observed |", "|---|---|---|---|---|"]
        for table, body in (report.get("tables") or {}).items():
            for exp in body.get("expectations", []):
                kwargs = ", ".join(f"{k}={_cell(v, 40)}" for k, v in sorted(exp.get("kwargs", {}).items()))
                res = exp.get("result") or {}
                observed = res.get("observed_value", res.get("unexpected_count", ""))
                lines.append(f"| {table} | {body.get('rows', '')} | `{exp.get('type')}`({kwargs}) | "
                             f"{'ok' if exp.get('success') else '**FAIL**'} | {_cell(observed, 60)} |")
        for failure in report.get("failures") or []:
            lines.append(f"\n- failed: {_cell(failure, 300)}")
        lines.append("")
    return "\n".join(lines)


def validation_summary(files: list[Path]) -> str:
    """'passed (12/12)' / 'FAILED: <first failure>' / 'none' for the run summary table."""
    if not files:
        return "none"
    total = passed = 0
    failures: list[str] = []
    for path in files:
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for body in (report.get("tables") or {}).values():
            for exp in body.get("expectations", []):
                total += 1
                passed += bool(exp.get("success"))
        failures += report.get("failures") or []
    return f"FAILED: {failures[0]}" if failures else f"passed ({passed}/{total})"


def metrics_markdown(stage: str, path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    rows = [f"| {k} | {_cell(v)} |" for k, v in sorted(data.items())
            if not isinstance(v, (dict, list)) and k != "params"]
    nested = [f"| {k} | {_cell(v, 200)} |" for k, v in sorted(data.items())
              if isinstance(v, (dict, list)) and k not in ("params", "table")]
    return f"### {stage}: metrics\n\n| metric | value |\n|---|---|\n" + "\n".join(rows + nested)


def metrics_table(path: Path) -> list[dict] | None:
    """The summary table a stage put in its metrics (`table`: one dict per row, e.g. eval's backbones next to
    their baselines), or None."""
    try:
        table = json.loads(path.read_text()).get("table")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return table if isinstance(table, list) and table and all(isinstance(r, dict) for r in table) else None


def stage_figures(stage: str, reports: Path) -> list[Path]:
    """The figures a stage drew: ``<reports>/figures/<stage>_*.png`` and ``<reports>/figures/<stage>/*.png``."""
    return sorted((reports / "figures").glob(f"{stage}_*.png")) + sorted((reports / "figures" / stage).glob("*.png"))


def figures_markdown(stage: str, reports: Path, max_side: int = 720) -> str | None:
    """The stage's figures as pictures in one Markdown artifact: each downscaled to `max_side` and embedded as a
    JPEG data URI, so the Prefect UI shows loss curves, k-NN curves, PCA maps and segmentation samples with no file
    server and no bucket access (a figure is ~100 kB of base64)."""
    parts = []
    for path in stage_figures(stage, reports):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((max_side, max_side))
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=85)
        except (OSError, ValueError):  # a figure being rewritten or unreadable: leave it out, never fail the stage
            continue
        parts.append(f"**{path.name}**\n\n![{path.stem}](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})")
    return f"### {stage}: figures\n\n" + "\n\n".join(parts) if parts else None


def summary_markdown(stage: str, reports: Path) -> str | None:
    """A stage's own human summary (``<reports>/<stage>_summary.md``, e.g. the eval table with its baselines and
    warnings) plus the figures it drew (``<reports>/figures/<stage>_*.png``, ``<reports>/figures/<stage>/``), listed
    with their paths: the UI shows what a run concluded, not only its numbers."""
    path = reports / f"{stage}_summary.md"
    text = path.read_text().strip() if path.is_file() else ""
    figures = stage_figures(stage, reports)
    if figures:
        text += ("\n\n" if text else "") + f"#### {stage}: figures\n\n" + "\n".join(
            f"- `{p.relative_to(reports.parent) if p.is_relative_to(reports.parent) else p}`" for p in figures)
    return text or None


def headline_metrics(path: Path, limit: int = 4) -> str:
    """A few scalar metrics for the one-line-per-stage summary."""
    if not path.exists():
        return ""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    scalars = [(k, v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and "seconds" not in k and k not in ("seed", "workers")]
    return ", ".join(f"{k}={_cell(v, 20)}" for k, v in scalars[:limit])


def metric_warnings(path: Path) -> list[str]:
    """The one-line ``warnings`` a stage put in its metrics (e.g. "no learning signal", raw pixels still win)."""
    try:
        warnings = json.loads(path.read_text()).get("warnings") or []
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    return [str(w) for w in warnings] if isinstance(warnings, list) else []


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def outputs_markdown(outputs: list[Output], spec: RemoteSpec | None, pushed: bool,
                     urls: dict[str, str | None] | None = None) -> str:
    """Each stage output with its hash and, when pushed, where its bytes live in the remote (``urls``: output path
    -> address from :func:`flows.remote.remote_urls`)."""
    lines = ["| stage | output | hash | size | files | remote object |", "|---|---|---|---|---|---|"]
    for out in outputs:
        where = "not cached (kept in git / run record)" if not out.cached else ""
        uri = (urls or {}).get(out.path)
        if out.cached and uri and spec is not None and pushed:
            http = spec.http_url(uri)
            where = f"[`{uri}`]({http})" if http else f"`{uri}`"
        elif out.cached and not pushed:
            where = "local cache only (no remote configured)"
        size = _human(out.size) if out.size else ""
        lines.append(f"| {out.stage} | `{out.path}` | `{(out.md5 or '')[:12]}` | {size} | {out.nfiles or ''} | "
                     f"{where} |")
    return "\n".join(lines)


def publish(kind: str, key: str, markdown: str, description: str) -> None:
    """Create a Markdown artifact; an artifact failure is logged, never fatal for the run."""
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)
    except Exception as exc:  # pragma: no cover - the API being down must not fail a finished stage
        _warn_unpublished(kind, key, exc)


def publish_table(key: str, rows: list[dict], description: str) -> None:
    """A Prefect table artifact (sortable rows in the UI); never fatal for the run."""
    from prefect.artifacts import create_table_artifact

    try:
        create_table_artifact(rows, key=artifact_key(key), description=description)
    except Exception as exc:  # pragma: no cover - the API being down must not fail a finished stage
        _warn_unpublished("table", key, exc)


def _warn_unpublished(kind: str, key: str, exc: Exception) -> None:
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning("could not publish the %s artifact %s: %s", kind, key, exc)
    except Exception:  # noqa: S110 - no run logger outside a flow run: nothing left to report to
        pass


def progress_publisher(stage: str) -> Callable[[str, float], None]:
    """`report(bar, percent)` for :class:`flows.progress.ProgressRelay`: one Prefect progress artifact per bar of
    the stage (`<stage>-<bar>-progress`), created on its first line and updated after; never fatal."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    ids: dict[str, Any] = {}
    failed: list[str] = []

    def report(bar: str, percent: float) -> None:
        if failed:
            return
        try:
            if bar in ids:
                update_progress_artifact(ids[bar], round(percent, 1))
            else:
                ids[bar] = create_progress_artifact(round(percent, 1), key=artifact_key(stage, bar, "progress"),
                                                    description=f"{stage}: {bar}")
        except Exception as exc:  # the API being down must not fail a running stage; stop trying for this stage
            failed.append(str(exc))

    return report
