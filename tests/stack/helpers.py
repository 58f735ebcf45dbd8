"""Talking to the real stack from tests: the Prefect CLI as users type it, and the API to check what happened."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def stack_env(stack, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a user who sourced infra/.state/env, minus the S3 keys (tests pass those explicitly)."""
    env = dict(os.environ)
    env.update({"PREFECT_API_URL": stack.cfg.api_url, "PREFECT_HOME": str(stack.prefect_home),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_CLI_PROMPT": "false",
                "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"})
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        env.pop(key, None)
    env.update(extra or {})
    return env


def prefect(stack, *args: str, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env=stack_env(stack), capture_output=True,
                          text=True, timeout=timeout, check=False)


def start_deployment_run(stack, name: str, params: dict, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`prefect deployment run NAME --params JSON --watch` in the background (``env``: the flow run's extra
    environment, as the `env` job variable of the process pool)."""
    cmd = [str(BIN / "prefect"), "deployment", "run", name, "--params", json.dumps(params), "--watch",
           "--watch-interval", "1", "--watch-timeout", "600"]
    if env:
        cmd += ["--job-variable", f"env={json.dumps(env)}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=stack_env(stack), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, UUID]:
    out, _ = proc.communicate(timeout=timeout)
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert m, out[-3000:]
    return proc.returncode, out, UUID(m.group(1))


def run_deployment(stack, name: str, params: dict, timeout: float = 600,
                   env: dict[str, str] | None = None) -> tuple[int, str, UUID, float]:
    start = time.perf_counter()
    code, out, run_id = finish(start_deployment_run(stack, name, params, env), timeout)
    return code, out, run_id, round(time.perf_counter() - start, 1)


def api(stack, fn):
    """Run `await fn(client)` against the stack's server."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def main():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings(updates={PREFECT_API_URL: stack.cfg.api_url}):
        return asyncio.run(main())


def flow_run(stack, run_id: UUID):
    return api(stack, lambda c: c.read_flow_run(run_id))


def task_runs(stack, run_id: UUID) -> dict[str, object]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = api(stack, lambda c: c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))))
    return {r.name: r for r in runs}


def artifacts(stack, run_id: UUID) -> dict[str, str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    found = api(stack, lambda c: c.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))))
    return {a.key: str(a.data) for a in found if a.key}


def wait_for(predicate, timeout: float, interval: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
