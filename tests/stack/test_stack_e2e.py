"""End to end on the real local stack: Prefect server (SQLite) + process worker + S3-compatible store (moto server),
all started by `infra/stack.sh` on free loopback ports in a temporary state folder, and stopped at the end.

Nothing is mocked: deployments are registered with `prefect deploy --all`, runs are started with
`prefect deployment run`, the worker executes the flow, which runs `dvc repro` per stage and `dvc push` to the
store over HTTP. The tests run in file order and share one small project (tests/conftest.py SMALL_DEMO):
first run -> rerun skips -> store crash mid-push -> bad credentials -> GX failure -> stop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import yaml

from flows.remote import lock_outputs
from flows.stack import LocalStack, StackConfig, free_port, port_open
from tasks.stages import STAGES

from ..conftest import SMALL_DEMO, make_project, project_env
from .helpers import (
    BIN,
    ROOT,
    api,
    artifacts,
    finish,
    flow_run,
    prefect,
    run_deployment,
    stack_env,
    start_deployment_run,
    task_runs,
    wait_for,
)
from .s3server import CrashableS3

pytestmark = pytest.mark.slow
FIGURES: dict[str, float] = {}
BLOCK = "dinov2-s3-credentials"


def _e2e_stages() -> list[str]:
    """Registry stages (DAG order) that dvc.yaml defines, up to DINOV2_E2E_UNTIL (default `ingest`: the stage
    whose data fault the GX test injects). What is checked here (deployment, worker, S3, retries, GX stop) does
    not depend on how many stages run; every stage is chained in tests/test_flow.py. Set DINOV2_E2E_UNTIL=shards
    (or a later stage) to drive more of the pipeline through the stack."""
    defined = set((yaml.safe_load((ROOT / "dvc.yaml").read_text()) or {}).get("stages") or {})
    until = os.environ.get("DINOV2_E2E_UNTIL", "ingest")
    chosen = []
    for name in STAGES:
        if name in defined:
            chosen.append(name)
        if name == until:
            break
    return chosen


E2E_STAGES = _e2e_stages()


def _script(stack: LocalStack, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update({"DINOV2_STACK_DIR": str(stack.state), "DINOV2_STACK_SERVER_PORT": str(stack.cfg.server_port),
                "DINOV2_STACK_S3_PORT": str(stack.cfg.s3_port), "DINOV2_STACK_WORKER_PORT": str(stack.cfg.worker_port),
                "DINOV2_STACK_WORKER_QUERY_SECONDS": "1", "DINOV2_PYTHON": sys.executable})
    return subprocess.run(["bash", str(ROOT / "infra" / "stack.sh"), *args], env=env, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    cfg = StackConfig(state_dir=tmp_path_factory.mktemp("stack"), server_port=free_port(), s3_port=free_port(),
                      worker_port=free_port(), query_seconds=1, project=ROOT)
    stack = LocalStack(cfg)
    start = time.perf_counter()
    res = _script(stack, "start", "--no-deploy", "--no-configure")
    FIGURES["stack_start_s"] = round(time.perf_counter() - start, 1)
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        yield stack
    finally:
        stack.stop()
        print("\nmeasured:", json.dumps(FIGURES))


@pytest.fixture(scope="module")
def s3_admin(stack):
    return boto3.client("s3", endpoint_url=stack.cfg.s3_url, region_name="us-east-1", **stack.credentials())


@pytest.fixture(scope="module")
def deployed(stack):
    """`prefect deploy --all` from the repository root, as a user would run it (pool created by the stack)."""
    start = time.perf_counter()
    res = prefect(stack, "--no-prompt", "deploy", "--all")
    FIGURES["prefect_deploy_all_s"] = round(time.perf_counter() - start, 1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _pause_schedules(stack)  # a scheduled run must never fire on the repository during the tests
    return res.stdout


def _pause_schedules(stack) -> None:
    async def pause(client):
        for d in await client.read_deployments():
            for schedule in d.schedules:
                await client.update_deployment_schedule(d.id, schedule.id, active=False)

    api(stack, pause)


@pytest.fixture(scope="module")
def project(stack, tmp_path_factory):
    """The small project, its DVC remote 'stack' -> the stack's store (endpoint only, in config.local), and the
    S3 keys only in a Prefect Secret block on the server."""
    from flows.deploy import save_credentials_block

    root = make_project(tmp_path_factory.mktemp("e2e") / "proj", [f"demo_data.{k}={v}" for k, v in SMALL_DEMO.items()])
    stack.configure_dvc_remote(root, "stack", with_credentials=False)
    save_credentials_block(stack.cfg.api_url, stack.credentials(), BLOCK)
    return root


@pytest.fixture(scope="module")
def first_run(stack, deployed, project):
    code, out, run_id, seconds = run_deployment(stack, "dinov2-pipeline/on-demand", {
        "project_dir": str(project), "stages": E2E_STAGES, "credentials_block": BLOCK, "retry_delay_s": 2})
    FIGURES["first_deployment_run_s"] = seconds
    assert code == 0, out[-4000:]
    return run_id


def _running(pid: int) -> bool:
    """Exists and is not a zombie (an exited child not yet reaped by init)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pushed_keys(project: Path) -> set[str]:
    """md5 of every object the current dvc.lock needs in a remote: file outputs, `.dir` listings, their files."""
    keys = set()
    for outs in lock_outputs((project / "dvc.lock").read_text(), (project / "dvc.yaml").read_text()).values():
        for out in outs:
            if not out.cached:
                continue
            keys.add(out.md5)
            if out.is_dir:
                listing = project / ".dvc" / "cache" / "files" / "md5" / out.md5[:2] / out.md5[2:]
                keys.update(entry["md5"] for entry in json.loads(listing.read_text()))
    return keys


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------- the stack
def test_stack_start_is_idempotent_healthy_and_keeps_its_state_in_one_folder(stack):
    before = stack.pids()
    assert all(before.values()), before
    res = _script(stack, "start", "--no-deploy", "--no-configure")
    assert res.returncode == 0, res.stderr
    assert "nothing (already running)" in res.stdout
    assert stack.pids() == before  # start twice = one of each
    status = _script(stack, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("healthy") == 3
    for name in ("s3", "server", "worker"):
        assert stack.pid_file(name).exists() and stack.log_file(name).stat().st_size > 0
    assert (stack.prefect_home / "prefect.db").exists()  # SQLite
    for secret_file in (stack.env_file, stack.credentials_file):
        assert secret_file.stat().st_mode & 0o077 == 0  # keys readable by the owner only
    secret = stack.credentials()["aws_secret_access_key"]
    assert secret not in res.stdout + res.stderr + status.stdout
    # credentials matter: the store refuses unknown keys
    bad = boto3.client("s3", endpoint_url=stack.cfg.s3_url, region_name="us-east-1",
                       aws_access_key_id="AKIAWRONGWRONGWRONG1", aws_secret_access_key="wrong")
    with pytest.raises(Exception, match="InvalidAccessKeyId"):
        bad.list_objects_v2(Bucket=stack.cfg.bucket)


def test_prefect_deploy_all_registers_the_scheduled_and_on_demand_deployments(stack, deployed):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    names = ["nightly-curation", "weekly-full", "on-demand", "curation-loop"]
    found = api(stack, lambda c: c.read_deployments(deployment_filter=DeploymentFilter(
        name=DeploymentFilterName(any_=names))))
    by_name = {d.name: d for d in found}
    assert set(by_name) == set(names)
    for d in by_name.values():
        assert d.work_pool_name == "dinov2-local" and d.entrypoint == "flows/pipeline.py:dinov2_pipeline"
        assert d.parameters.get("remote") == "stack"
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    crons = {n: [s.schedule.cron for s in by_name[n].schedules] for n in names}  # registered (paused by the fixture)
    assert crons == {"nightly-curation": ["0 2 * * *"], "weekly-full": ["0 4 * * 0"], "on-demand": [],
                     "curation-loop": []}
    assert by_name["nightly-curation"].parameters["stages"][0] == "ingest"
    assert by_name["nightly-curation"].parameters["stages"][-1] == "shards"
    assert by_name["curation-loop"].parameters["rounds"] == 2  # the flow's own parameter, schema-checked
    pool = api(stack, lambda c: c.read_work_pool("dinov2-local"))
    assert pool.type == "process" and pool.concurrency_limit == 1


def test_gpu_kubernetes_pool_template_is_validated_by_the_server_not_run(stack, tmp_path):
    template = ROOT / "infra" / "k8s" / "gpu-base-job-template.json"
    res = prefect(stack, "work-pool", "create", "dinov2-gpu", "--type", "kubernetes",
                  "--base-job-template", str(template), "--paused")
    assert res.returncode == 0, res.stdout + res.stderr
    pool = api(stack, lambda c: c.read_work_pool("dinov2-gpu"))
    assert pool.type == "kubernetes" and pool.is_paused
    container = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    # the GPU deployments register against it (the server checks their job variables against the schema) ...
    res = prefect(stack, "--no-prompt", "deploy", "--all", "--prefect-file", "infra/k8s/prefect.gpu.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    gpu = api(stack, lambda c: c.read_deployment_by_name("dinov2-pipeline/paper-train"))
    assert gpu.work_pool_name == "dinov2-gpu" and gpu.job_variables["gpu_count"] == 8
    # ... and the validation is real: a template using an undeclared variable is refused
    broken = json.loads(template.read_text())
    broken["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["priorityClassName"] = "{{ nope }}"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    res = prefect(stack, "work-pool", "create", "broken-gpu", "--type", "kubernetes",
                  "--base-job-template", str(tmp_path / "broken.json"))
    assert res.returncode != 0 and "nope" in res.stdout + res.stderr


# --------------------------------------------------------------------------------------------------- runs
def test_deployment_run_publishes_stage_artifacts_and_lands_outputs_in_s3(stack, project, first_run, s3_admin):
    run = flow_run(stack, first_run)
    assert run.state.is_completed()
    tasks = task_runs(stack, first_run)
    assert "ingest" in E2E_STAGES
    for stage in E2E_STAGES:
        assert tasks[f"dvc repro {stage}"].state.is_completed(), tasks.keys()
    assert tasks["dvc push to stack"].state.is_completed() and tasks["run record to stack"].state.is_completed()

    arts = artifacts(stack, first_run)
    for stage in E2E_STAGES:
        assert f"{stage}-metrics" in arts, arts.keys()
    assert "expect_column_values_to_be_unique" in arts["ingest-validation"]
    assert "| ingest | yes" in arts["pipeline-summary"]
    assert f"s3://{stack.cfg.bucket}/dvc/files/md5/" in arts["pipeline-outputs"]

    outputs = lock_outputs((project / "dvc.lock").read_text(), (project / "dvc.yaml").read_text())
    keys = {o["Key"] for page in s3_admin.get_paginator("list_objects_v2").paginate(Bucket=stack.cfg.bucket)
            for o in page.get("Contents", [])}
    for outs in outputs.values():
        for out in outs:
            if not out.cached:
                assert f"dvc/runs/{first_run}/{out.path}" in keys  # metrics travel in the run record
                continue
            assert f"dvc/files/md5/{out.md5[:2]}/{out.md5[2:]}" in keys
            listing = json.loads(s3_admin.get_object(Bucket=stack.cfg.bucket,
                                                     Key=f"dvc/files/md5/{out.md5[:2]}/{out.md5[2:]}")["Body"].read())
            assert all(f"dvc/files/md5/{e['md5'][:2]}/{e['md5'][2:]}" in keys for e in listing)
    assert f"dvc/runs/{first_run}/dvc.lock" in keys


def test_any_stage_artifact_can_be_fetched_back_by_run_and_by_git_revision(stack, project, first_run, tmp_path):
    keys = {"AWS_ACCESS_KEY_ID": stack.credentials()["aws_access_key_id"],
            "AWS_SECRET_ACCESS_KEY": stack.credentials()["aws_secret_access_key"]}
    cli = [str(BIN / "dinov2-pipeline"), "fetch", "--remote", "stack"]
    env = stack_env(stack, keys)
    res = subprocess.run(cli + ["data/ingest/manifest.parquet", "--run", str(first_run), "--project", str(project),
                                "--out", str(tmp_path / "by-run")], env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    fetched = tmp_path / "by-run" / "data" / "ingest" / "manifest.parquet"
    assert fetched.read_bytes() == (project / "data" / "ingest" / "manifest.parquet").read_bytes()

    git_env = project_env()
    subprocess.run(["git", "add", "dvc.yaml", "dvc.lock", "params.yaml"], cwd=project, check=True, env=git_env)
    subprocess.run(["git", "commit", "-qm", "run 1"], cwd=project, check=True, env=git_env)
    res = subprocess.run(cli + ["ingest", "--rev", "HEAD", "--project", str(project), "--out", str(tmp_path / "by-rev")],
                         env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    src, dst = project / "data" / "ingest", tmp_path / "by-rev" / "data" / "ingest"
    assert {p.relative_to(src): _md5(p) for p in src.rglob("*") if p.is_file()} == \
           {p.relative_to(dst): _md5(p) for p in dst.rglob("*") if p.is_file()}


def test_second_run_with_no_change_skips_every_stage(stack, project, first_run):
    code, out, run_id, seconds = run_deployment(stack, "dinov2-pipeline/on-demand", {
        "project_dir": str(project), "stages": E2E_STAGES, "credentials_block": BLOCK})
    FIGURES["rerun_all_skipped_s"] = seconds
    assert code == 0, out[-3000:]
    summary = artifacts(stack, run_id)["pipeline-summary"]
    for stage in E2E_STAGES:
        assert f"| {stage} | skipped (up to date) |" in summary, summary


def test_store_crash_mid_push_is_retried_and_leaves_no_half_written_object(stack, project, first_run, tmp_path):
    """The store's front end dies after 150 uploads, with uploads in flight. The push attempt fails, the task
    backs off (Prefect retry); at that moment every object the store holds hashes to its own key. The store
    comes back, the retry completes the push, and a pull into an empty cache gets verified files."""
    store = CrashableS3().start()
    bucket = f"crash-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=store.url, region_name="us-east-1", aws_access_key_id="a",
                 aws_secret_access_key="b").create_bucket(Bucket=bucket)
    env = project_env()
    dvc = str(BIN / "dvc")
    subprocess.run([dvc, "remote", "add", "-f", "crashy", f"s3://{bucket}/dvc"], cwd=project, check=True, env=env)
    for key, value in (("endpointurl", store.url), ("access_key_id", "a"), ("secret_access_key", "b")):
        subprocess.run([dvc, "remote", "modify", "--local", "crashy", key, value], cwd=project, check=True, env=env)
    expected = _pushed_keys(project)  # what `dvc push` must upload for the current dvc.lock
    n_objects = len(expected)
    assert n_objects > 300
    store.crash_on_put = 150
    try:
        proc = start_deployment_run(stack, "dinov2-pipeline/on-demand", {
            "project_dir": str(project), "stages": E2E_STAGES, "remote": "crashy", "retries": 4, "retry_delay_s": 4})
        assert store.crashed.wait(180), "the push never reached the store"

        def awaiting_retry():
            runs = [r for r in api(stack, lambda c: c.read_task_runs()) if r.name == "dvc push to crashy"]
            # a task run the server has just created can have no state yet
            state = runs[0].state if runs else None
            return state is not None and state.name in ("AwaitingRetry", "Retrying") and runs[0]

        wait_for(awaiting_retry, 120, what="the push task to fail and back off")
        held = CrashableS3.objects(bucket)
        assert 0 < len(held) < n_objects
        assert CrashableS3.incomplete_objects(held) == []  # nothing half-written is visible
        store.start()  # same port, same data
        code, out, run_id = finish(proc)
    finally:
        store.stop()
    assert code == 0, out[-3000:]
    push = task_runs(stack, run_id)["dvc push to crashy"]
    assert push.state.is_completed() and push.run_count >= 2
    held = CrashableS3.objects(bucket)
    assert CrashableS3.incomplete_objects(held) == []
    assert {k.split("/files/md5/")[1].replace("/", "") for k in held if "/files/md5/" in k} == expected

    # a pull into an empty cache and workspace gets complete, hash-verified files back
    store.start()
    try:
        shutil.rmtree(project / ".dvc" / "cache")
        for outs in lock_outputs((project / "dvc.lock").read_text(), (project / "dvc.yaml").read_text()).values():
            for out in outs:
                if out.cached and (project / out.path).exists():
                    shutil.rmtree(project / out.path) if out.is_dir else (project / out.path).unlink()
        res = subprocess.run([dvc, "pull", "-r", "crashy", *E2E_STAGES], cwd=project, env=env, capture_output=True,
                             text=True, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        store.stop()
    status = subprocess.run([dvc, "status", "--json", *E2E_STAGES], cwd=project, env=env, capture_output=True,
                            text=True, check=False)
    assert json.loads(status.stdout or "{}") == {}, status.stdout
    listing_md5 = {}
    for outs in lock_outputs((project / "dvc.lock").read_text()).values():
        for out in outs:
            if out.is_dir:
                cached = project / ".dvc" / "cache" / "files" / "md5" / out.md5[:2] / out.md5[2:]
                for entry in json.loads(cached.read_text()):
                    listing_md5[project / out.path / entry["relpath"]] = entry["md5"]
    assert listing_md5 and all(_md5(path) == md5 for path, md5 in listing_md5.items())


def test_bad_credentials_fail_with_one_clear_line_and_no_secret(stack, project, first_run, tmp_path):
    from flows.deploy import save_credentials_block

    wrong = {"aws_access_key_id": "AKIAWRONGWRONGWRONG1", "aws_secret_access_key": "not-the-secret-0123456789"}
    save_credentials_block(stack.cfg.api_url, wrong, "bad-s3-credentials")
    code, out, run_id, _ = run_deployment(stack, "dinov2-pipeline/on-demand", {
        "project_dir": str(project), "stages": E2E_STAGES, "credentials_block": "bad-s3-credentials"})
    assert code != 0
    run = flow_run(stack, run_id)
    message = run.state.message or ""
    assert run.state.is_failed() and "\n" not in message.strip(), message
    assert "rejected the credentials" in message and "remote 'stack'" in message, message
    assert wrong["aws_secret_access_key"] not in message and wrong["aws_secret_access_key"] not in out
    assert task_runs(stack, run_id)["dvc push to stack"].run_count == 1  # deterministic: no retry

    res = subprocess.run([str(BIN / "dinov2-pipeline"), "fetch", "ingest", "--remote", "stack", "--run", str(first_run),
                          "--project",
                          str(project), "--out", str(tmp_path)], capture_output=True, text=True,
                         env=stack_env(stack, {"AWS_ACCESS_KEY_ID": wrong["aws_access_key_id"],
                                               "AWS_SECRET_ACCESS_KEY": wrong["aws_secret_access_key"]}), check=False)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and "rejected the credentials" in res.stderr
    assert wrong["aws_secret_access_key"] not in res.stderr + res.stdout


def test_gx_failure_stops_the_run_with_the_expectation_name_in_its_state_message(stack, project, first_run, tmp_path):
    """A data fault at a stage boundary: ingest's output breaks its `stored_files` expectation (a stored image
    missing; injected into the validated table, since DVC empties a stage's outputs before it runs, so a corrupt
    store cannot survive into a run). The run fails at once (no retry), the state message names the expectation,
    and the project's params.yaml is left as it was even though the run had overrides."""
    from tasks.validation import FAULT_ENV

    params_before = (project / "params.yaml").read_bytes()
    code, _, run_id, _ = run_deployment(stack, "dinov2-pipeline/on-demand", {
        "project_dir": str(project), "stages": E2E_STAGES, "credentials_block": BLOCK,
        "overrides": ["ingest.workers=2"]}, env={FAULT_ENV: "ingest.stored_files"})
    assert code != 0
    run = flow_run(stack, run_id)
    assert run.state.is_failed()
    assert "expect_column_values_to_be_in_set" in run.state.message and "stored_files" in run.state.message
    assert task_runs(stack, run_id)["dvc repro ingest"].run_count == 1
    assert "**FAIL**" in artifacts(stack, run_id)["ingest-validation"]
    assert (project / "params.yaml").read_bytes() == params_before


_UI_FLOW = """
import sys
from pathlib import Path
from prefect import flow
from flows.artifacts import figures_markdown, metrics_table, publish, publish_table
reports = Path(sys.argv[1])

@flow(name="ui-check")
def ui_check():
    publish_table("eval-table", metrics_table(reports / "metrics" / "eval.json"), "eval: summary table")
    publish("figures", "eval-figures", figures_markdown("eval", reports), "eval: figures")

state = ui_check(return_state=True)
print(state.state_details.flow_run_id)
"""


def _browser_dom(url: str) -> str:
    """The page as headless Chromium renders it, after its scripts ran."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    res = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=180, check=False)
    return res.stdout


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="needs Debian's chromium (infra/setup-system.sh installs it)")
def test_the_prefect_ui_shows_the_eval_table_and_figures_in_a_real_browser(stack, tmp_path):
    """What a person sees: the flow-run page (Artifacts tab) lists the eval table and figures, the table's page shows
    the numbers of eval's metrics, and the figures page shows pictures, in headless Chromium against the stack's UI.
    The artifacts are made by the flow's own publishing code from an eval metrics file and figure."""
    import numpy as np
    from PIL import Image

    from tasks.eval import summary_rows

    result = {"kind": "trained", "knn": {"20": {"top1": 0.6771}}, "knn_top1_best": 0.6812,
              "linear": {"test_top1": 0.7013}, "segmentation": {"miou": 0.0683, "pixel_acc": 0.9125}}
    rows = summary_rows({"pretrain-teacher": result, "raw-pixels": {**result, "kind": "raw-pixels",
                                                                     "knn": {"20": {"top1": 0.7661}}}})
    reports = tmp_path / "reports"
    (reports / "metrics").mkdir(parents=True)
    (reports / "metrics" / "eval.json").write_text(json.dumps({"results": {}, "table": rows}))
    (reports / "figures" / "eval").mkdir(parents=True)
    Image.fromarray((np.random.default_rng(0).random((300, 900, 3)) * 255).astype("uint8")).save(
        reports / "figures" / "eval" / "pca_pretrain-teacher.png")
    res = subprocess.run([sys.executable, "-c", _UI_FLOW, str(reports)], cwd=ROOT, env=stack_env(stack),
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    run_id = uuid.UUID(res.stdout.strip().splitlines()[-1])
    page = _browser_dom(f"{stack.cfg.ui_url}/v2/runs/flow-run/{run_id}?tab=Artifacts")
    assert "eval-table" in page and "eval-figures" in page, page[-2000:]
    found = {a.key: a.id for a in api(stack, lambda c: c.read_artifacts())
             if a.key in ("eval-table", "eval-figures") and a.flow_run_id == run_id}
    table_page = _browser_dom(f"{stack.cfg.ui_url}/artifacts/artifact/{found['eval-table']}")
    for value in ("0.6771", "0.7661", "0.7013", "pretrain-teacher", "raw-pixels"):
        assert value in table_page, value
    figures_page = _browser_dom(f"{stack.cfg.ui_url}/artifacts/artifact/{found['eval-figures']}")
    assert '<img src="data:image/jpeg;base64,' in figures_page and "pca_pretrain-teacher.png" in figures_page


def test_stop_ends_every_process_the_stack_started(stack):
    pids = stack.pids()
    res = _script(stack, "stop")
    assert res.returncode == 0, res.stderr
    for name, pid in pids.items():
        assert pid is not None and not _running(pid), name
        assert not stack.pid_file(name).exists()
    for port in (stack.cfg.server_port, stack.cfg.s3_port, stack.cfg.worker_port):
        assert not port_open(stack.cfg.host, port)
    assert any((stack.state / "s3-snapshot").rglob("*.dir")) and "snapshot" in res.stdout
    assert _script(stack, "status").returncode == 3
