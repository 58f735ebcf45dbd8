"""Orchestration pieces that need no server: stage selection, params for a run, failure classification,
artifact tables, fetching by hash from a remote, deployment files and cluster templates."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import pipeline
from flows.artifacts import (
    artifact_key,
    metrics_markdown,
    outputs_markdown,
    summary_markdown,
    validation_files,
    validation_markdown,
)
from flows.cli import EXIT_CREDENTIALS, EXIT_TRANSIENT
from flows.fetch import fetch
from flows.remote import (
    RemoteError,
    RemoteSpec,
    lock_outputs,
    push_outputs,
    remote_urls,
    resolve_remote,
    translate_remote_error,
)
from tasks.stages import STAGES
from tasks.storage import CredentialsError, StorageError

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------- stage selection
def test_all_registry_stages_in_dag_order_by_default():
    selected, ignored = pipeline.select_stages(None, list(STAGES))
    assert selected == list(STAGES) and ignored == []


def test_selection_keeps_dag_order():
    registry = list(STAGES)
    selected, ignored = pipeline.select_stages(list(reversed(registry[:2])), registry)
    assert selected == registry[:2] and ignored == []


def test_stage_missing_from_the_projects_dvc_yaml_is_skipped_not_run():
    registry = list(STAGES)
    selected, ignored = pipeline.select_stages(None, registry[:1])
    assert selected == registry[:1] and ignored == registry[1:]


def test_unknown_stage_is_an_error_naming_it():
    with pytest.raises(pipeline.StageFailed, match="nope"):
        pipeline.select_stages(["nope"], list(STAGES))


# ------------------------------------------------------------------------------------------- params for a run
def _project(tmp_path: Path) -> Path:
    for name in ("params.yaml", "params.paper.yaml", "dvc.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    return tmp_path


def test_overrides_are_validated_before_anything_runs(tmp_path):
    project = _project(tmp_path)
    with pytest.raises(pipeline.StageFailed, match=r"ingest\.workers"):
        pipeline.resolve_run_params(project, "params.yaml", ["ingest.workers=0"])
    with pytest.raises(pipeline.StageFailed, match="unknown key 'ingest.nope'"):
        pipeline.resolve_run_params(project, "params.yaml", ["ingest.nope=1"])


def test_no_override_leaves_params_yaml_alone(tmp_path):
    text, params = pipeline.resolve_run_params(_project(tmp_path), "params.yaml", [])
    assert text is None and params.ingest.workers >= 1


def test_override_and_profile_resolve_to_the_runs_params(tmp_path):
    project = _project(tmp_path)
    text, params = pipeline.resolve_run_params(project, "params.yaml", ["ingest.workers=2"])
    assert params.ingest.workers == 2 and yaml.safe_load(text)["ingest"]["workers"] == 2
    paper, params = pipeline.resolve_run_params(project, "params.paper.yaml", [])
    assert params.profile == "paper" and yaml.safe_load(paper)["profile"] == "paper"


def _tiny_dvc_project(path: Path) -> Path:
    """A git + DVC project with one stage whose output path and content come from params.yaml."""
    path.mkdir()
    (path / "params.yaml").write_text("a:\n  x: 1\n  out: data/a.txt\n")
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {
        "cmd": "python -c \"import yaml,pathlib; p=yaml.safe_load(open('params.yaml'))['a']; "
               "pathlib.Path(p['out']).write_text(str(p['x']))\"",
        "params": ["a"], "outs": ["${a.out}"]}}}))
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=path, check=True)
    (path / "data").mkdir()
    return path


def test_a_run_with_overrides_never_rewrites_params_yaml(tmp_path):
    """The run's params live in the run view: DVC there writes the project's dvc.lock and outputs (an output under a
    folder the project did not have yet included), the project's params.yaml keeps its bytes throughout, and a
    view left by a killed run is replaced by the next one."""
    project = _tiny_dvc_project(tmp_path / "p")
    original = (project / "params.yaml").read_bytes()
    (project / pipeline._VIEW).mkdir(parents=True)
    (project / pipeline._VIEW / "params.yaml").write_text("# left by a killed run\n")
    run_text = "a:\n  x: 2\n  out: fresh/a.txt\n"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with pipeline.run_view(project, run_text) as where:
        assert where != project and (where / "params.yaml").read_text() == run_text
        res = subprocess.run([str(BIN / "dvc"), "repro"], check=False, cwd=where, env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        assert (project / "params.yaml").read_bytes() == original
    assert (project / "fresh" / "a.txt").read_text() == "2"
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["s"]
    assert lock["params"]["params.yaml"]["a"]["x"] == 2 and lock["outs"][0]["path"] == "fresh/a.txt"
    assert (project / ".dvc" / "cache").is_dir()  # the project's cache, not one in the view
    assert not (project / pipeline._VIEW).exists() and (project / "params.yaml").read_bytes() == original
    # back in the project, DVC sees the params the outputs were made with differ from params.yaml
    status = subprocess.run([str(BIN / "dvc"), "status", "--json"], check=True, cwd=project, env=env, capture_output=True,
                            text=True)
    assert "s" in json.loads(status.stdout)
    with pipeline.run_view(project, None) as where:  # the project's own params: no view at all
        assert where == project


def test_one_run_per_project_at_a_time(tmp_path):
    with (
        pipeline.project_lock(tmp_path),
        pytest.raises(pipeline.StageFailed, match="another dinov2-pipeline run"),
        pipeline.project_lock(tmp_path),
    ):
        pass


# ------------------------------------------------------------------------------------------- retries
def test_failed_check_and_bad_params_are_never_retried():
    lines = ["> dinov2-pipeline stage ingest",
             "error: ingest: data-quality check failed: stored_files: expect_column_values_to_be_in_set(...)",
             "ERROR: failed to reproduce 'ingest': failed to run: dinov2-pipeline stage ingest, exited with 3"]
    exc = pipeline.classify_stage_failure("ingest", 255, lines, stage_exit=3)
    assert isinstance(exc, pipeline.StageFailed)
    assert "exit 3" in str(exc) and "expect_column_values_to_be_in_set" in str(exc)
    exc = pipeline.classify_stage_failure("ingest", 255, ["error: params.yaml: x: bad", "ERROR: ... exited with 2"],
                                          stage_exit=2)
    assert isinstance(exc, pipeline.StageFailed)


def test_the_flow_log_keeps_a_traceback_only_where_it_helps(monkeypatch):
    """Prefect logs a flow's exception with its traceback; the pipeline's own failures are one line (their message
    names cause and fix), a bug keeps its traceback, and DINOV2_DEBUG=1 keeps every traceback."""
    import logging

    def logged(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except type(exc):
            record = logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception: %r",
                                       (exc,), sys.exc_info())
        pipeline._NoTracebackForKnownFailures().filter(record)
        return record

    monkeypatch.delenv("DINOV2_DEBUG", raising=False)
    for known in (pipeline.StageFailed("stage x failed"), pipeline.TransientStageError("s3 down"), RemoteError("x")):
        record = logged(known)
        assert record.exc_info is None and "Traceback" not in logging.Formatter().format(record)
    assert logged(KeyError("bug")).exc_info is not None
    monkeypatch.setenv("DINOV2_DEBUG", "1")
    assert logged(pipeline.StageFailed("stage x failed")).exc_info is not None


def test_stopping_the_flow_stops_the_stage_command_and_what_it_started(tmp_path):
    """Ctrl-C or a cancel while `dvc repro` runs: the stage (here a child that starts a grandchild, as DVC starts the
    stage command and that its torchrun) must not go on unwatched; before, it ran on and even wrote to the flow's
    stage-run log after the flow had removed it."""
    import time

    script = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(120)']); print(c.pid, flush=True); time.sleep(120)")

    class StopOnFirstLine:
        pid = 0

        def info(self, line: str) -> None:
            self.pid = int(line)
            raise KeyboardInterrupt

    logger = StopOnFirstLine()
    with pytest.raises(KeyboardInterrupt):
        pipeline._stream([sys.executable, "-c", script], tmp_path, dict(os.environ), logger)

    def alive(pid: int) -> bool:
        stat = Path(f"/proc/{pid}/stat")
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie no one reaped is dead too
        except (FileNotFoundError, ProcessLookupError):
            return False

    deadline = time.monotonic() + 10
    while alive(logger.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert logger.pid and not alive(logger.pid)


def test_the_stage_commands_own_exit_code_decides_what_is_retried_not_its_words():
    net = ["error: StorageError: s3://b/k: network error (EndpointConnectionError: Could not connect)",
           "ERROR: failed to reproduce 'shards': failed to run: dinov2-pipeline stage shards, exited with 75"]
    assert isinstance(pipeline.classify_stage_failure("shards", 255, net, stage_exit=EXIT_TRANSIENT),
                      pipeline.TransientStageError)
    # the same words under a final exit code stay final: the flow does not read the text
    assert isinstance(pipeline.classify_stage_failure("shards", 255, net, stage_exit=1), pipeline.StageFailed)
    # DVC failed around the command (the stage never wrote its exit): final
    assert isinstance(pipeline.classify_stage_failure("x", 255, ["ERROR: Connection refused"]), pipeline.StageFailed)


@pytest.mark.parametrize(("exc", "code"), [
    (StorageError("s3://b/k: network error (EndpointConnectionError)", transient=True), EXIT_TRANSIENT),
    (StorageError("s3://b/k: HTTP 503", transient=True), EXIT_TRANSIENT),
    (CredentialsError("s3://b/k: S3 rejected the credentials (InvalidAccessKeyId)"), EXIT_CREDENTIALS),
    (ConnectionRefusedError(111, "Connection refused"), EXIT_TRANSIENT),
    (TimeoutError("read timed out"), EXIT_TRANSIENT),
    (ValueError("503 rows"), 1),  # a number that looks like an HTTP status is not a network fault
    (FileNotFoundError("data/x: missing"), 1),
])
def test_stage_command_exit_codes_carry_the_verdict(exc, code, capsys):
    import typer

    from flows.cli import _guarded

    def stage():
        raise exc

    with pytest.raises(typer.Exit) as info:
        _guarded(stage)
    assert info.value.exit_code == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_back_off_doubles():
    assert pipeline.backoff(3, 5) == [5, 10, 20] and pipeline.backoff(0, 5) == []


def test_flow_parameters_cover_stages_overrides_profile_and_push():
    params = inspect.signature(pipeline.dinov2_pipeline.fn).parameters
    for name in ("stages", "overrides", "profile", "project_dir", "force", "push", "remote", "credentials_block",
                 "retries", "retry_delay_s"):
        assert name in params


# ------------------------------------------------------------------------------------------- artifacts
def _gx_report(tmp_path: Path, stage: str, ok: bool) -> Path:
    report = {"stage": stage, "success": ok, "tables": {"manifest": {"success": ok, "rows": 3, "expectations": [
        {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "sha256"}, "success": ok,
         "result": {"unexpected_count": 0 if ok else 2}}]}},
        "failures": [] if ok else ["manifest: expect_column_values_to_be_unique(column='sha256'): 2 unexpected"]}
    path = tmp_path / "validation" / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path


def test_validation_table_names_each_expectation_and_the_failure(tmp_path):
    _gx_report(tmp_path, "ingest", ok=False)
    (tmp_path / "validation" / "ingest-input.json").write_text((tmp_path / "validation" / "ingest.json").read_text())
    _gx_report(tmp_path, "ingest2", ok=True)
    files = validation_files(tmp_path, "ingest", {"ingest2"})
    assert [f.name for f in files] == ["ingest-input.json", "ingest.json"]
    md = validation_markdown("ingest", files)
    assert "`expect_column_values_to_be_unique`(column=sha256)" in md and "**FAIL**" in md
    assert "2 unexpected" in md


def test_metrics_table_and_artifact_keys(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"kept": 3, "rate": 0.123456, "by": {"a": 1}, "params": {"x": 1}}))
    md = metrics_markdown("ingest", path)
    assert "| kept | 3 |" in md and "| rate | 0.1235 |" in md and "params" not in md
    assert artifact_key("Demo_Data", "metrics") == "demo-data-metrics"


def test_an_output_moved_outside_the_project_is_refused_in_one_line():
    """DVC tracks outputs inside the project only; the flow says so before any stage starts."""
    from flows.pipeline import StageFailed, resolve_run_params

    with pytest.raises(StageFailed, match=r"ingest.out=/elsewhere/ingest: outside the project"):
        resolve_run_params(ROOT, "params.yaml", ["ingest.out=/elsewhere/ingest"])
    text, params = resolve_run_params(ROOT, "params.yaml", ["ingest.out=data/ingest-b", "dedup.images=data/ingest-b"])
    assert params.ingest.out == "data/ingest-b" and "data/ingest-b" in text
    # an absolute path into the project is made relative: DVC runs in the run view, where it would be outside
    text, _ = resolve_run_params(ROOT, "params.yaml", [f"ingest.out={ROOT}/data/ingest-c"])
    assert yaml.safe_load(text)["ingest"]["out"] == "data/ingest-c"
    # shards may live in S3: dvc.yaml does not interpolate shards.out, so the flow lets it through
    resolve_run_params(ROOT, "params.yaml", ["shards.out=s3://bucket/shards"])


def test_stage_summary_artifact_has_the_summary_and_lists_the_figures(tmp_path):
    reports = tmp_path / "reports"
    (reports / "figures" / "eval").mkdir(parents=True)
    (reports / "eval_summary.md").write_text("## Evaluation\n\n| backbone | k-NN |\n|---|---|\n| teacher | 0.68 |\n")
    (reports / "figures" / "eval" / "pca_teacher.png").write_bytes(b"png")
    (reports / "figures" / "pretrain_loss.png").write_bytes(b"png")
    md = summary_markdown("eval", reports)
    assert "| teacher | 0.68 |" in md and "reports/figures/eval/pca_teacher.png" in md
    assert "pretrain_loss" not in md  # another stage's figure
    assert "reports/figures/pretrain_loss.png" in summary_markdown("pretrain", reports)
    assert summary_markdown("ingest", reports) is None


def test_outputs_table_links_pushed_objects_to_s3():
    spec = RemoteSpec("stack", "s3://bucket/dvc", endpoint_url="http://127.0.0.1:9000")
    outs = lock_outputs(yaml.safe_dump({"stages": {"ingest": {"outs": [
        {"path": "data/ingest", "md5": "ab" * 16 + ".dir", "size": 10, "nfiles": 2},
        {"path": "reports/metrics/ingest.json", "md5": "cd" * 16, "size": 1}]}}}),
        yaml.safe_dump({"stages": {"ingest": {"outs": ["data/ingest"],
                                              "metrics": [{"reports/metrics/ingest.json": {"cache": False}}]}}}))
    uri = f"s3://bucket/dvc/files/md5/ab/{'ab' * 15}.dir"  # what dvc.api.get_url answers for it
    md = outputs_markdown(outs["ingest"], spec, pushed=True, urls={"data/ingest": uri})
    assert f"`{uri}`" in md
    assert f"(http://127.0.0.1:9000/bucket/dvc/files/md5/ab/{'ab' * 15}.dir)" in md
    assert "not cached" in md


def test_cache_flags_follow_interpolated_paths():
    """dvc.yaml paths come from params.yaml (`${reports}/...`): the lock's resolved paths, wherever a profile put
    them, still get their declared `cache:` flag."""
    outs = lock_outputs(yaml.safe_dump({"stages": {"pretrain": {"outs": [
        {"path": "runs/a/export", "md5": "ab" * 16 + ".dir"},
        {"path": "out/reports/plots/pretrain.csv", "md5": "cd" * 16},
        {"path": "out/reports/figures/pretrain_loss.png", "md5": "ef" * 16}]},
        "ingest": {"outs": [{"path": "data/x", "md5": "ab" * 16 + ".dir"},
                            {"path": "reports/metrics/ingest.json", "md5": "cd" * 16}]}}}),
        yaml.safe_dump({"stages": {"pretrain": {"outs": ["${pretrain.out}/export"], "plots": [
            {"${reports}/plots/pretrain.csv": {"cache": False, "x": "step"}},
            {"${reports}/figures/pretrain_loss.png": {"cache": False}}]},
            # a bare `${ingest.out}` matches any path: the metrics file must still get its own, more literal flag
            "ingest": {"outs": ["${ingest.out}"], "metrics": [{"${reports}/metrics/ingest.json": {"cache": False}}]}}}))
    assert [o.cached for o in outs["pretrain"]] == [True, False, False]
    assert [o.cached for o in outs["ingest"]] == [True, False]


# ------------------------------------------------------------------------------------------- fetch
_FILES = {"manifest.parquet": b"manifest-bytes", "images/ab/x.png": b"png-bytes"}
_STAGE_SCRIPT = """import json, pathlib
for rel, data in {files!r}.items():
    path = pathlib.Path("data/ingest") / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
pathlib.Path("reports/metrics").mkdir(parents=True, exist_ok=True)
pathlib.Path("reports/metrics/ingest.json").write_text(json.dumps({{"kept": 1}}))
"""


def _real_project(tmp_path: Path) -> tuple[Path, Path]:
    """A real DVC project (no git) whose one stage ran and was pushed to a local remote, plus a run record of it
    (`runs/run-1/`: dvc.lock, dvc.yaml and the uncached metrics, as `flows.pipeline.publish_run_record` writes),
    after which the workspace and its cache are deleted: only the remote has the bytes."""
    from dvc.repo import Repo

    remote = tmp_path / "remote"
    project = tmp_path / "project"
    project.mkdir()
    Repo.init(str(project), no_scm=True).close()
    (project / ".dvc" / "config").write_text(f"[core]\n    no_scm = true\n    remote = r\n"
                                             f"['remote \"r\"']\n    url = {remote}\n")
    (project / "make_ingest.py").write_text(_STAGE_SCRIPT.format(files=_FILES))
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"ingest": {
        "cmd": f"{sys.executable} make_ingest.py", "outs": ["data/ingest"], "metrics": [{"reports/metrics/ingest.json": {"cache": False}}]}}}))
    with contextlib.chdir(project), Repo(str(project)) as repo:  # DVC resolves stage targets from the cwd
        repo.reproduce()
    spec = resolve_remote(project)
    assert push_outputs(project, spec) == 3  # 2 files + the folder's listing (metrics are cache: false)
    assert push_outputs(project, spec) == 0  # nothing new: a retried push uploads only what is missing
    run = remote / "runs" / "run-1"
    for name in ("dvc.lock", "dvc.yaml", "reports/metrics/ingest.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes((project / name).read_bytes())
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    return project, remote


def test_fetch_by_run_gets_a_stage_a_folder_or_one_file_hash_verified_from_the_remote_alone(tmp_path):
    project, _ = _real_project(tmp_path)
    got = fetch("ingest", tmp_path / "out", project=project, run="run-1")
    assert {g.path for g in got} == {"data/ingest", "reports/metrics/ingest.json"}
    for rel, data in _FILES.items():
        assert (tmp_path / "out" / "data" / "ingest" / rel).read_bytes() == data
    assert json.loads((tmp_path / "out" / "reports" / "metrics" / "ingest.json").read_text()) == {"kept": 1}
    got = fetch("data/ingest/images", tmp_path / "out2", project=project, run="run-1")
    assert got[0].files == 1 and (tmp_path / "out2" / "data" / "ingest" / "images" / "ab" / "x.png").exists()
    fetch("data/ingest/manifest.parquet", tmp_path / "out3", project=project)  # the working tree's dvc.lock
    assert (tmp_path / "out3" / "data" / "ingest" / "manifest.parquet").read_bytes() == b"manifest-bytes"
    assert not (project / "data").exists() and not (project / ".dvc" / "cache").exists()  # read nothing local
    assert [p.name for p in (tmp_path / "out").iterdir()] != [] and not list((tmp_path / "out").glob(".fetch-*"))


def test_output_links_come_from_dvc_and_point_at_the_pushed_objects(tmp_path):
    project, remote = _real_project(tmp_path)
    urls = remote_urls(project, ["data/ingest", "reports/metrics/ingest.json", "data/nothing"], resolve_remote(project))
    listing = Path(urls["data/ingest"])
    assert listing.is_relative_to(remote) and listing.name.endswith(".dir") and listing.is_file()
    assert urls["reports/metrics/ingest.json"] is None and urls["data/nothing"] is None  # cache: false / untracked


def test_fetch_refuses_a_corrupt_object_and_names_what_is_missing(tmp_path):
    from dvc.api import get_url

    project, remote = _real_project(tmp_path)
    stored = Path(get_url("data/ingest/images/ab/x.png", repo=str(project), remote="r"))  # DVC says where
    assert stored.is_relative_to(remote) and stored.read_bytes() == b"png-bytes"
    stored.chmod(0o644)
    stored.write_bytes(b"png-byte")  # truncated in the store
    with pytest.raises(RemoteError, match="do not match their hash"):
        fetch("data/ingest/images/ab/x.png", tmp_path / "out", project=project, run="run-1")
    assert not (tmp_path / "out" / "data" / "ingest" / "images" / "ab" / "x.png").exists()
    stored.unlink()
    with pytest.raises(RemoteError, match="not in remote 'r'.*was it pushed"):
        fetch("data/ingest", tmp_path / "out", project=project, run="run-1")
    with pytest.raises(RemoteError, match="run 'nope' has no run record"):
        fetch("ingest", tmp_path / "out", project=project, run="nope")
    with pytest.raises(RemoteError, match="neither a stage nor a stage output"):
        fetch("data/other", tmp_path / "out", project=project, run="run-1")
    with pytest.raises(RemoteError, match=r"stage 'pretrain' has no outputs in the dvc.lock of the run run-1: it had "
                                          r"not run there \(stages that had: ingest\)"):
        fetch("pretrain", tmp_path / "out", project=project, run="run-1")


def test_s3_errors_become_one_line_without_secrets():
    from botocore.exceptions import ClientError, EndpointConnectionError

    spec = RemoteSpec("stack", "s3://b/dvc", access_key_id="AKIA1", secret_access_key="s3cr3t-value")
    err = translate_remote_error(ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "no"}}, "GetObject"),
                             spec, "s3://b/k")
    assert "rejected the credentials" in str(err) and "s3cr3t" not in str(err) and "\n" not in str(err)
    err = translate_remote_error(EndpointConnectionError(endpoint_url="http://x"), spec, "s3://b/k")
    assert err.transient
    # s3fs raises a Python error from botocore's: the code is on the cause
    wrapped = PermissionError("The AWS Access Key Id you provided does not exist in our records.")
    wrapped.__cause__ = ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "no"}}, "GetObject")
    err = translate_remote_error(wrapped, spec, "s3://b/k")
    assert "rejected the credentials" in str(err) and "remote 'stack'" in str(err) and not err.transient
    head = PermissionError("Forbidden")  # a HEAD (s3fs reads an object's size first) has no body: bare 403
    head.__cause__ = ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject")
    assert "rejected the credentials" in str(translate_remote_error(head, spec, "s3://b/k"))
    assert "s3cr3t" not in repr(spec)


# ------------------------------------------------------------------------------------------- deployment files
def test_prefect_yaml_declares_nightly_weekly_and_on_demand_on_the_process_pool():
    conf = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in conf["deployments"]}
    assert set(deps) == {"nightly-curation", "weekly-full", "on-demand", "curation-loop"}
    for d in deps.values():
        assert d["entrypoint"] == "flows/pipeline.py:dinov2_pipeline" and d["work_pool"]["name"] == "dinov2-local"
        module, func = d["entrypoint"].split(":")
        assert (ROOT / module).exists() and hasattr(pipeline, func)
        assert set(d.get("parameters", {})) <= set(inspect.signature(pipeline.dinov2_pipeline.fn).parameters)
    assert deps["nightly-curation"]["schedules"][0]["cron"] == "0 2 * * *"
    assert deps["weekly-full"]["schedules"][0]["cron"] == "0 4 * * 0"
    assert "schedules" not in deps["on-demand"]
    assert deps["curation-loop"]["parameters"]["rounds"] == 2 and "schedules" not in deps["curation-loop"]
    # the registry is the one stage list: every stage subset a deployment or GPU deployment names is registered
    # stages in the registry's DAG order, so a renamed or reordered stage fails here, not at 2 a.m.
    gpu = yaml.safe_load((ROOT / "infra" / "k8s" / "prefect.gpu.yaml").read_text())["deployments"]
    for d in [*deps.values(), *gpu]:
        subset = (d.get("parameters") or {}).get("stages") or []
        assert subset == [s for s in STAGES if s in subset], (d["name"], subset)
    assert deps["nightly-curation"]["parameters"]["stages"]


def test_gpu_pool_template_passes_the_servers_validation_and_renders_a_gpu_job():
    import jsonschema
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import apply_values

    template = json.loads((ROOT / "infra" / "k8s" / "gpu-base-job-template.json").read_text())
    validate_base_job_template(template)  # every {{ placeholder }} is a declared variable
    variables = template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.validate(defaults, variables)
    gpu_file = yaml.safe_load((ROOT / "infra" / "k8s" / "prefect.gpu.yaml").read_text())
    for dep in gpu_file["deployments"]:
        values = defaults | {k: v for k, v in dep["work_pool"]["job_variables"].items()}
        jsonschema.validate(values, variables)
        assert dep["work_pool"]["name"] == "dinov2-gpu"
    job = apply_values(template["job_configuration"]["job_manifest"], defaults | {"env": {}, "labels": {}})
    pod = job["spec"]["template"]["spec"]
    assert job["kind"] == "Job" and pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert {"mountPath": "/dev/shm", "name": "dshm"} in pod["containers"][0]["volumeMounts"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "dinov2-s3"}}]  # keys only via a Secret


def test_submit_renders_a_checked_indexed_job_that_runs_the_stage_per_node(tmp_path):
    """`dinov2-pipeline submit`: Service + Indexed Job that pass the Kubernetes API models; each pod runs the stage
    entry point once (no torchrun around it: the stage starts one per node) with its index as the node rank."""
    from flows.submit import ManifestError, check_manifest, job_request, render

    out = tmp_path / "job.yaml"
    res = subprocess.run([str(BIN / "dinov2-pipeline"), "submit", "pretrain", "--nnodes", "4", "--gpus", "8",
                          "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    service, job = yaml.safe_load_all(out.read_text())
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert job["kind"] == "Job" and job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "dinov2-pretrain"
    container = pod["containers"][0]
    assert container["command"] == ["dinov2-pipeline", "stage", "pretrain", "--params", "params.paper.yaml"]
    assert "torchrun" not in " ".join(container["command"] + container["args"])
    overrides = dict(a.split("=", 1) for a in container["args"] if a != "-S")
    assert overrides == {"launch.nnodes": "4", "launch.nproc_per_node": "8",
                         "launch.node_rank": "$(JOB_COMPLETION_INDEX)",
                         "launch.master_addr": "dinov2-pretrain-0.dinov2-pretrain", "launch.master_port": "29500"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # the pods' params are valid for every node rank (the stage would refuse them otherwise)
    from tasks.params import load_params

    load_params(ROOT / "params.paper.yaml", [f"{k}={v}" for k, v in overrides.items()
                                              if k != "launch.node_rank"] + ["launch.node_rank=3"])

    # what the API would refuse or silently drop is refused here, naming the field
    bad = dict(job, spec=dict(job["spec"], completionz=4))
    with pytest.raises(ManifestError, match="completionz"):
        check_manifest(bad)
    with pytest.raises(ManifestError, match="int"):
        check_manifest(dict(job, spec=dict(job["spec"], completions="four")))
    broken = tmp_path / "template.yaml"
    broken.write_text((ROOT / "infra" / "k8s" / "torchrun-indexed-job.yaml").read_text()
                      .replace("restartPolicy: Never", "restartPolicy: Never\n      restartPolcy: Never"))
    with pytest.raises(ManifestError, match="restartPolcy"):
        render(job_request("pretrain", ROOT / "params.paper.yaml", 4, 8), broken)
    # a node count the loader cannot be split over (24 GPUs: 128 streams each for 12 workers), or a stage that does
    # not train: one line, before any pod
    for args, needle in ((["pretrain", "--nnodes", "3", "--gpus", "8"],
                          "num_workers: 12 loader processes cannot share the 128 shard stream(s)"),
                         (["eval"], "not a training stage")):
        res = subprocess.run([str(BIN / "dinov2-pipeline"), "submit", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, check=False)
        assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_scale_doc_covers_the_paper_scale_plan_and_leaves_slots_for_benchmarks():
    text = (ROOT / "infra" / "SCALE.md").read_text()
    for needle in ("LVD-142M", "ViT-g/14", "torchrun", "IVF-PQ", "k-means", "s3://", "cost", "reports/bench",
                   "measured", "assumption"):
        assert needle.lower() in text.lower(), needle


def test_local_default_remote_lets_make_run_push_offline():
    from dvc.config import Config

    conf = Config(dvc_dir=str(ROOT / ".dvc"), validate=False) if "validate" in inspect.signature(
        Config).parameters else Config(dvc_dir=str(ROOT / ".dvc"))
    default = conf["core"]["remote"]
    assert not str(conf["remote"][default]["url"]).startswith(("s3://", "http"))
    assert conf["remote"]["stack"]["url"].startswith("s3://")
    committed = (ROOT / ".dvc" / "config").read_text()
    assert "secret_access_key" not in committed and "access_key_id" not in committed
    assert os.path.isabs(conf["remote"][default]["url"])


def test_cost_model_marks_missing_measurements_as_slots_and_reads_them_when_present(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("cost_model", ROOT / "infra" / "cost_model.py")
    cost_model = importlib.util.module_from_spec(spec)
    sys.modules["cost_model"] = cost_model  # dataclasses look their module up there
    spec.loader.exec_module(cost_model)
    empty = cost_model.model(tmp_path, with_training=False)
    assert any(r.source == "SLOT" and "make bench" in r.note for r in empty)
    (tmp_path / "reports" / "bench").mkdir(parents=True)
    (tmp_path / "reports" / "bench" / "curation_algos.json").write_text(json.dumps({
        "machine": {"cpus": 2}, "knn": {"n": 1000, "dim": 64, "ivf_queries_per_s": 5000.0},
        "kmeans": {"kmeans_n": 1000, "kmeans_clusters": 10, "kmeans_niter": 5, "kmeans_s": 0.5}}))
    rows = {r.item: r for r in cost_model.model(tmp_path, with_training=False)}
    assert rows["measured: knn_ivf_queries_s"].value == 5000.0 and rows["measured: knn_ivf_queries_s"].source == "measured"
    assert rows["k-means 100k clusters on GPUs"].source == "ASSUMED"
    assert "| **SLOT** |" in cost_model.markdown(empty)


def test_gpu_image_dockerfile_copies_what_exists_and_is_the_image_deployments_name():
    """No docker daemon here: the build is checked as far as this machine allows. Every path it copies exists, the
    extras it installs exist, it is the image `submit` and the GPU deployments name, and faiss comes from exactly one
    of the cpu/gpu extras."""
    import shlex
    import tomllib

    from flows.submit import IMAGE

    text = (ROOT / "infra" / "docker" / "Dockerfile.gpu").read_text()
    sources = [src for line in text.splitlines() if line.startswith("COPY ") for src in shlex.split(line)[1:-1]]
    assert sources and all((ROOT / src).exists() for src in sources), [s for s in sources if not (ROOT / s).exists()]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(src.split("/")[0] in ignored for src in sources)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = text.split("pip install -e '.[")[1].split("]")[0].split(",")
    assert set(installed) <= set(extras) and "gpu" in installed and "cpu" not in installed
    assert f"-t {IMAGE} " in text
    deployments = yaml.safe_load((ROOT / "infra" / "k8s" / "prefect.gpu.yaml").read_text())["definitions"]
    assert {node["job_variables"]["image"] for node in deployments.values()} == {IMAGE}
    faiss = {name for name, deps in extras.items() if any(d.startswith("faiss") for d in deps)}
    assert faiss == {"cpu", "gpu"}
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert not any(d.startswith("faiss") for d in core)
