"""Shared fixtures: a small, real demo dataset built once per session, and project copies for DVC runs."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Each test process (one per pytest-xdist worker) gets its own Prefect home: the temporary servers that flow runs
# start keep their SQLite database there, and two workers' servers on one database file would lock each other.
_PREFECT_HOME = tempfile.mkdtemp(prefix=f"prefect-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)


def _drop_prefect_exit_hooks() -> None:
    """In a forked child: forget the exit hooks of Prefect's queue services (the log and event workers an in-process
    flow run starts, e.g. under prefect_test_harness). Prefect 3.8 resets those services after a fork but leaves
    their threading exit hook, which then fails (`assert self._done_event is not None`), so every process forked
    later in the same test process, a DataLoader worker too, exits with code 1. The pipeline's own processes never
    fork after Prefect starts (stages run in fresh processes): only test processes need this."""
    services = sys.modules.get("prefect._internal.concurrency.services")
    hooks = getattr(threading, "_threading_atexits", None)
    if services is None or hooks is None:
        return
    base = services._QueueServiceBase
    hooks[:] = [h for h in hooks if not isinstance(getattr(getattr(h, "func", h), "__self__", None), base)]


os.register_at_fork(after_in_child=_drop_prefect_exit_hooks)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding end-to-end (`slow`) tests first, the rest after, each group in its own order: `make test` hands
    whole files to its processes in this order (`--no-loadscope-reorder`), so minutes-long files start at once and
    the short ones fill in around them, instead of one of them running alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: the order within each group stays


# Small but complete: every planted kind is present, so the same assertions hold as on the default profile.
SMALL_DEMO = {
    "n_in_domain": 200,
    "n_off_domain_photos": 40,
    "n_off_domain_text": 20,
    "n_exact_duplicates": 20,
    "n_near_duplicates": 30,
    "n_eval_copies": 10,
    "n_seed": 50,
    "n_eval_train": 100,
    "n_eval_test": 100,
    "n_seg_train": 20,
    "n_seg_test": 10,
    # The default crawl's 2 dead loopback URLs (connection refused: a transient fault) are 0.04% of its rows, under
    # ingest.max_transient_fraction; in a crawl this small they would be 0.6% and fail the stage, as an outage
    # should. Unreachable sources are tested on their own (tests/test_ingest_sources.py).
    "dead_http_urls": 0,
}


def small_overrides(root: Path) -> list[str]:
    return [f"demo_data.{k}={v}" for k, v in SMALL_DEMO.items()] + [
        f"demo_data.out={root}/demo",
        f"ingest.manifest={root}/demo/crawl/manifest.csv",
        f"ingest.out={root}/ingest",
        f"reports={root}/reports",
        "ingest.retry_backoff_s=0.05",
        f"ingest.resume_dir={root}/ingest-resume",
    ]


@pytest.fixture(scope="session")
def small_demo_sizes() -> dict[str, int]:
    return dict(SMALL_DEMO)


@pytest.fixture(scope="session")
def small_params_factory():
    from tasks.params import load_params

    def make(root: Path, extra: list[str] | None = None):
        return load_params(ROOT / "params.yaml", small_overrides(root) + (extra or []))

    return make


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory, small_params_factory) -> Path:
    """The small demo data, built once and shared read-only by the tests."""
    from tasks.demo_data import build_demo_data

    root = tmp_path_factory.mktemp("demo")
    build_demo_data(small_params_factory(root).demo_data)
    return root


@pytest.fixture(scope="session")
def ingested(demo_dir, small_params_factory, tmp_path_factory):
    """One ingest run over the small demo crawl: (params, result, ground truth)."""
    import pandas as pd

    from tasks.ingest import run_ingest

    out = tmp_path_factory.mktemp("ingest")
    params = small_params_factory(demo_dir, [f"ingest.out={out}/ingest", f"reports={out}/reports"])
    result = run_ingest(params)
    gt = pd.read_parquet(demo_dir / "demo" / "ground_truth.parquet")
    return params, result, gt


def make_project(dest: Path, overrides: list[str]) -> Path:
    """A throwaway copy of the project (dvc.yaml, params, stage code) as its own git+DVC repo."""
    import yaml

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, dest / name)
    for code in ("tasks", "dinov2_core"):  # DVC hashes stage code as dependencies
        shutil.copytree(ROOT / code, dest / code, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = project_env()
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=env)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=dest, check=True, env=env)
    return dest


def project_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GIT_AUTHOR_NAME", "test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@example.com")
    env.setdefault("GIT_COMMITTER_NAME", "test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@example.com")
    return env


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on loopback, with throwaway credentials."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_without_credentials(s3_server, monkeypatch, tmp_path):
    """The S3-compatible server's endpoint with no credentials anywhere (environment, files, instance metadata)."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    return s3_server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Credentials and endpoint in the environment, as users provide them (never in params files)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


@pytest.fixture
def s3_bucket(s3_env):
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1").create_bucket(Bucket=name)
    return name

