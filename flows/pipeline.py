"""The `dinov2-pipeline` Prefect flow: one Prefect task per DVC stage, in DAG order.

DVC decides what reruns (its lock file and cache), so `dvc repro` alone gives the same outputs and a second
run with no change skips every stage. Prefect adds what DVC lacks: retries for transient faults, schedules,
a UI with per-stage logs, durations and metrics. Works with a Prefect server (PREFECT_API_URL) or without
one (Prefect's ephemeral mode).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.stages import STAGES

# Output that marks a failure worth retrying (network, object store throttling); anything else is final.
_TRANSIENT = re.compile(
    r"network error|Connection refused|timed out|Timeout|EndpointConnectionError|SlowDown|"
    r"ServiceUnavailable|Temporary failure|Connection reset|503|502|504",
    re.IGNORECASE,
)


class StageFailed(RuntimeError):
    """A stage failed for a deterministic reason (bad data, failed check): retrying cannot help."""


class TransientStageError(RuntimeError):
    """A stage failed on something a retry may fix (network, S3 endpoint down)."""


def _env() -> dict[str, str]:
    """The venv's bin first on PATH so DVC's stage `cmd`s find `dinov2-pipeline`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    return env


def _dvc() -> str:
    candidate = Path(sys.executable).parent / "dvc"
    return str(candidate) if candidate.exists() else "dvc"


def _retry_transient(task_, task_run, state) -> bool:
    try:
        state.result()
    except TransientStageError:
        return True
    except Exception:
        return False
    return False


def _metrics_markdown(stage: str, project: Path) -> str | None:
    path = project / "reports" / "metrics" / f"{stage}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows = [f"| {k} | {v} |" for k, v in data.items() if not isinstance(v, (dict, list))]
    nested = [f"| {k} | `{json.dumps(v, sort_keys=True)[:200]}` |" for k, v in data.items()
              if isinstance(v, dict) and k != "params"]
    return f"### {stage} metrics\n\n| metric | value |\n|---|---|\n" + "\n".join(rows + nested)


@task(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=_retry_transient, log_prints=True)
def run_dvc_stage(stage: str, project_dir: str, force: bool = False) -> dict:
    """`dvc repro <stage>` with its output in the task's logs; reports whether DVC actually ran it."""
    logger = get_run_logger()
    project = Path(project_dir)
    cmd = [_dvc(), "repro", stage] + (["--force"] if force else [])
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=project, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line:
            lines.append(line)
            logger.info(line)
    code = proc.wait()
    seconds = round(time.perf_counter() - start, 2)
    text = "\n".join(lines)
    if code != 0:
        errors = [ln for ln in lines if ln.startswith("error:") or ln.startswith("ERROR")]
        message = f"stage {stage} failed (exit {code}): {errors[0] if errors else (lines[-1] if lines else '')}"
        if _TRANSIENT.search(text):
            raise TransientStageError(message)
        raise StageFailed(message)
    skipped = f"Stage '{stage}' didn't change, skipping" in text or "is cached - skipping run" in text
    markdown = _metrics_markdown(stage, project)
    if markdown and not skipped:
        create_markdown_artifact(key=f"{stage}-metrics", markdown=markdown, description=f"{stage} metrics")
    return {"stage": stage, "ran": not skipped, "seconds": seconds}


@flow(name="dinov2-pipeline", log_prints=True)
def dinov2_pipeline(stages: list[str] | None = None, project_dir: str = ".", force: bool = False) -> dict:
    """Run the selected stages (default: all) in DAG order; stop at the first failure with its one-line reason."""
    selected = [s for s in STAGES if not stages or s in stages]
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise StageFailed(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
    results = [run_dvc_stage(stage, project_dir, force) for stage in selected]
    lines = ["| stage | ran | seconds |", "|---|---|---|"]
    lines += [f"| {r['stage']} | {'yes' if r['ran'] else 'skipped (up to date)'} | {r['seconds']} |" for r in results]
    summary = "\n".join(lines)
    create_markdown_artifact(key="pipeline-summary", markdown=summary, description="stages run by this flow")
    return {"success": True, "stages": results, "summary": summary}
