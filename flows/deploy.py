"""Work pools and deployments on a Prefect server: what `make stack` / `dinov2-pipeline deploy` do.

- `dinov2-local`: a *process* work pool for this machine (concurrency 1: one DVC workspace, one run at a time).
- `dinov2-gpu`: a *kubernetes* work pool from `infra/k8s/gpu-base-job-template.json` for real clusters; created
  (which makes the server validate the template) and paused, never run here.
- Deployments: `prefect deploy --all` over `prefect.yaml` (local pool) and, with `gpu=True`, over
  `infra/k8s/prefect.gpu.yaml` (GPU pool).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOCAL_POOL = "dinov2-local"
GPU_POOL = "dinov2-gpu"
GPU_TEMPLATE = ROOT / "infra" / "k8s" / "gpu-base-job-template.json"
GPU_PREFECT_FILE = ROOT / "infra" / "k8s" / "prefect.gpu.yaml"
S3_BLOCK = "dinov2-s3-credentials"


class DeployError(RuntimeError):
    pass


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def prefect_env(api_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PREFECT_API_URL": api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "PREFECT_CLI_PROMPT": "false"})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def _run_async(coro):
    return asyncio.run(coro)


def _with_api(api_url: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: api_url})


async def _ensure_pool(name: str, type_: str, template: dict[str, Any] | None, concurrency: int | None,
                       paused: bool = False) -> str:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            pool = await client.read_work_pool(name)
            update: dict[str, Any] = {"concurrency_limit": concurrency, "is_paused": paused}
            if template is not None:
                update["base_job_template"] = template
            await client.update_work_pool(name, WorkPoolUpdate(**update))
            return f"updated {pool.type} pool {name}"
        except ObjectNotFound:
            if template is None:
                from prefect.workers.process import ProcessWorker

                template = ProcessWorker.get_default_base_job_template()
            await client.create_work_pool(WorkPoolCreate(name=name, type=type_, base_job_template=template,
                                                         concurrency_limit=concurrency, is_paused=paused))
            return f"created {type_} pool {name}"


def ensure_local_pool(api_url: str, name: str = LOCAL_POOL, concurrency: int = 1) -> str:
    with _with_api(api_url):
        return _run_async(_ensure_pool(name, "process", None, concurrency))


def load_gpu_template(path: Path = GPU_TEMPLATE) -> dict[str, Any]:
    return json.loads(path.read_text())


def ensure_gpu_pool(api_url: str, name: str = GPU_POOL) -> str:
    """The Kubernetes GPU pool from the committed template, paused (no cluster here: validated, not run)."""
    with _with_api(api_url):
        return _run_async(_ensure_pool(name, "kubernetes", load_gpu_template(), None, paused=True))


def save_credentials_block(api_url: str, credentials: dict[str, str], name: str = S3_BLOCK) -> None:
    """Store S3 credentials as a Prefect Secret block (the flow's `credentials_block` parameter reads it)."""
    from prefect.blocks.system import Secret

    with _with_api(api_url):
        Secret(value=credentials).save(name, overwrite=True)


def prefect_deploy(api_url: str, project: Path = ROOT, prefect_file: Path | None = None,
                   extra_env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """`prefect --no-prompt deploy --all` in the project folder; returns its output, raises on failure."""
    cmd = [_bin("prefect"), "--no-prompt", "deploy", "--all"]
    if prefect_file is not None:
        cmd += ["--prefect-file", str(prefect_file)]
    proc = subprocess.run(cmd, cwd=project, env=prefect_env(api_url, extra_env), capture_output=True, text=True,
                          timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        last = [ln for ln in output.splitlines() if ln.strip()][-3:]
        raise DeployError(f"prefect deploy --all failed (exit {proc.returncode}): {' | '.join(last)}")
    return output


def deploy_all(api_url: str, project: Path = ROOT, gpu: bool = False) -> list[str]:
    """Pools first (deploy refuses unknown pools), then every deployment in prefect.yaml (and the GPU file)."""
    done = [ensure_local_pool(api_url)]
    prefect_deploy(api_url, project)
    done.append("deployed prefect.yaml")
    if gpu:
        done.append(ensure_gpu_pool(api_url))
        prefect_deploy(api_url, project, GPU_PREFECT_FILE)
        done.append(f"deployed {GPU_PREFECT_FILE.relative_to(ROOT)}")
    return done
