"""The `dinov2-pipeline` Prefect flow: one Prefect task per DVC stage, in DAG order, then `dvc push`.

DVC decides what reruns (its lock file and cache), so `dvc repro` alone gives the same outputs and a second
run with no change skips every stage. Prefect adds what DVC lacks: retries with back-off for transient faults,
schedules, and a UI with per-stage logs, durations, data-quality results and metrics as artifacts. Works with a
Prefect server (PREFECT_API_URL) or without one (Prefect's ephemeral mode).

Stages come from the registry (`tasks.stages.STAGES`), never from a list here.

Params overrides and profiles never rewrite the project's tracked `params.yaml`. A run with a profile or overrides
runs DVC in a *run view* of the project (`.dvc/tmp/run-view`, which the project's DVC ignores): a folder holding
the run's own `params.yaml` (profile file + `key=value` overrides, validated by `tasks.params.load_params` first)
and a symlink to every other top-level entry, with a DVC config that uses the project's cache and remotes. DVC there
reads the run's params, reruns exactly the stages that depend on changed ones, and writes the project's `dvc.lock`
and outputs through the links; the run record keeps the params the run used. DVC reads params only from
`params.yaml` (and its `vars` cannot redefine a key params.yaml has), and `dvc exp run --set-param` needs a git
commit and runs the whole pipeline as one process (no per-stage Prefect task, retries or artifacts): hence the view.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil
import yaml
from prefect import flow, get_run_logger, task

from flows.artifacts import (
    figures_markdown,
    headline_metrics,
    metric_warnings,
    metrics_markdown,
    metrics_table,
    outputs_markdown,
    progress_publisher,
    publish,
    publish_table,
    summary_markdown,
    validation_files,
    validation_markdown,
    validation_summary,
)
from flows.cli import EXIT_CREDENTIALS, EXIT_TRANSIENT, STAGE_RUN_LOG_ENV
from flows.experiments import NoExperiment, save_experiment
from flows.progress import ProgressRelay
from flows.remote import (
    CredentialsRejected,
    RemoteError,
    RemoteSpec,
    RemoteStore,
    credentials_from_block,
    project_outputs,
    remote_urls,
    resolve_remote,
)
from tasks.loop import ROUND_STAGES, dvc_stage, rounds_setting
from tasks.params import ParamsError, load_params, parse_override, read_params_tree
from tasks.stages import STAGES

# Exit codes of `dinov2-pipeline stage` that are never worth a retry: 2 bad params, 3 failed GX check.
_DETERMINISTIC_EXIT = {2, 3}
_VIEW = ".dvc/tmp/run-view"  # inside .dvc: the project's own DVC never collects the view's dvc.yaml link
_LOCK = ".dvc/tmp/dinov2-pipeline.lock"


class StageFailed(RuntimeError):
    """A stage failed for a deterministic reason (bad data, failed check, bad params): retrying cannot help."""


class TransientStageError(RuntimeError):
    """A stage or push failed on something a retry may fix (network, S3 endpoint down)."""


# ----------------------------------------------------------------------------------------------- helpers
def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The venv's bin first on PATH so DVC's stage `cmd`s find `dinov2-pipeline`; no telemetry."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.update(extra or {})
    return env


def _dvc() -> str:
    candidate = Path(sys.executable).parent / "dvc"
    return str(candidate) if candidate.exists() else "dvc"


def _cli() -> str:
    candidate = Path(sys.executable).parent / "dinov2-pipeline"
    return str(candidate) if candidate.exists() else "dinov2-pipeline"


def _retry_transient(task_, task_run, state) -> bool:
    try:
        state.result()
    except TransientStageError:
        return True
    except Exception:
        return False
    return False


def backoff(retries: int, first_delay_s: float) -> list[float]:
    """Exponential back-off: d, 2d, 4d, ..."""
    return [round(first_delay_s * 2**i, 3) for i in range(max(0, retries))]


def _stream(cmd: list[str], cwd: Path, env: dict[str, str], logger,
            reachable: Callable[[], bool] | None = None, patience_s: float = 3.0,
            relay: ProgressRelay | None = None) -> tuple[int, list[str], bool]:
    """Run `cmd`, forwarding each output line to the task's log; returns (exit code, lines, aborted).

    With `relay`, progress-bar lines are thinned to one per bar every few seconds and mirrored in progress
    artifacts (`flows.progress`); every other line is forwarded as it comes.

    With `reachable`, a watchdog checks the remote every second while the command runs and stops it (SIGTERM,
    then SIGKILL) once the remote has been unreachable for `patience_s`: DVC would otherwise let every queued
    upload exhaust its own retries (minutes for a few hundred objects) before failing. The back-off between
    attempts is Prefect's (task retries); stopping a push half-way is safe (whole-object PUTs, see dvc_push).
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    aborted = threading.Event()
    done = threading.Event()

    def watch() -> None:
        down_since = None
        while not done.wait(1.0):
            if reachable():
                down_since = None
                continue
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since >= patience_s:
                aborted.set()
                _stop(proc)
                return

    watcher = threading.Thread(target=watch, daemon=True) if reachable is not None else None
    if watcher:
        watcher.start()
    lines: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                lines.append(line)
                if relay is None or relay.forward(line):
                    logger.info(line)
        code = proc.wait()
    except BaseException:  # Ctrl-C, a cancel, a crash of the flow: no stage may go on training unwatched
        _stop(proc)
        raise
    finally:
        done.set()
    if aborted.is_set():
        lines.append(f"ERROR: stopped after the remote was unreachable for {patience_s:.0f} s (Connection refused)")
        logger.warning(lines[-1])
        return code or 1, lines, True
    return code, lines, False


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the command and every process it started (DVC, the stage command, its torchrun and ranks), SIGKILL
    to what is left after `grace_s`. They stay in the flow's process group, so a runner that kills the group (a
    Prefect cancel's hard kill) still reaches them all."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    proc.wait()


def endpoint_reachable(spec: RemoteSpec) -> Callable[[], bool] | None:
    """A cheap TCP check of the remote's endpoint (None for local remotes)."""
    if not spec.is_s3:
        return None

    url = urlparse(spec.endpoint_url or f"https://s3.{spec.region or 'us-east-1'}.amazonaws.com")
    host, port = url.hostname or "localhost", url.port or (443 if url.scheme == "https" else 80)

    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=2):
                return True
        except OSError:
            return False

    return check


def project_stages(project: Path) -> list[str]:
    dvc_yaml = project / "dvc.yaml"
    if not dvc_yaml.exists():
        raise StageFailed(f"{project}: no dvc.yaml (is --project the pipeline's folder?)")
    return list((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages") or {})


def select_stages(requested: list[str] | None, available: list[str]) -> tuple[list[str], list[str]]:
    """Registry stages (DAG order) that were requested and exist in the project's dvc.yaml.

    Returns (selected, ignored): registry stages the project's dvc.yaml lacks are skipped with a warning; a name
    that is not a registry stage is an error.
    """
    registry = list(STAGES)
    requested = list(requested or [])
    unknown = sorted(set(requested) - set(registry))
    if unknown:
        raise StageFailed(f"unknown stage(s) {unknown}; stages: {registry}")
    wanted = [s for s in registry if not requested or s in requested]
    return [s for s in wanted if s in available], [s for s in wanted if s not in available]


def resolve_run_params(project: Path, profile: str, overrides: list[str]) -> tuple[str | None, Any]:
    """Validate profile + overrides; return (params.yaml text for this run or None if unchanged, Params)."""

    profile_path = (project / profile) if not Path(profile).is_absolute() else Path(profile)
    try:
        params = load_params(profile_path, overrides)
    except ParamsError as exc:
        raise StageFailed(f"params: {exc}") from None
    outside = outputs_outside_project(project, params.model_dump(mode="json"))
    if outside:
        raise StageFailed(f"params: {', '.join(outside)}: outside the project, and DVC tracks outputs only inside it "
                          f"({project}); use a path under it, or `dinov2-pipeline stage NAME --set ...` for a one-off "
                          f"run elsewhere")
    if profile_path.resolve() == (project / "params.yaml").resolve() and not overrides:
        return None, params
    tree = read_params_tree(profile_path)  # an overlay profile is written out whole: DVC sees every value
    for item in overrides:
        key, value = parse_override(item)
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    for key in _interpolated_keys(project, ("deps", "outs", "metrics", "plots")):
        # DVC runs in the run view, where an absolute path into the project is outside the repo: make it relative
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(leaf) if isinstance(node, dict) else None
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).resolve().is_relative_to(
                project.resolve()):
            node[leaf] = Path(value).resolve().relative_to(project.resolve()).as_posix()
    header = (f"# Written by the dinov2-pipeline flow for one run: {profile_path.name}"
              f"{' + ' + ', '.join(overrides) if overrides else ''}.\n"
              f"# DVC reads it in the run view ({_VIEW}); the project's params.yaml is not touched.\n")
    return header + yaml.safe_dump(tree, sort_keys=False), params


def _interpolated_keys(project: Path, kinds: tuple[str, ...]) -> set[str]:
    """The params keys dvc.yaml interpolates (`${section.key}`) into the given kinds of stage paths."""
    stages = (yaml.safe_load((project / "dvc.yaml").read_text()) or {}).get("stages") or {}
    return {key for body in stages.values() for kind in kinds for item in body.get(kind) or []
            for path in ([item] if isinstance(item, str) else item) for key in re.findall(r"\$\{([\w.]+)\}", str(path))}


def outputs_outside_project(project: Path, tree: dict) -> list[str]:
    """`key=value` of every param that dvc.yaml interpolates into an output path and that points outside the
    project (an absolute path elsewhere or a URL): DVC cannot track it, and would refuse the stage half-way."""
    bad = set()
    for key in _interpolated_keys(project, ("outs", "metrics", "plots")):
        value: Any = tree
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and ("://" in value or (
                Path(value).is_absolute() and not Path(value).resolve().is_relative_to(project.resolve()))):
            bad.add(f"{key}={value}")
    return sorted(bad)


def _remove_view(view: Path) -> None:
    """Delete a run view: its links first (never followed), then what is left (the view's own .dvc)."""
    if not view.exists():
        return
    for entry in view.iterdir():
        if entry.is_symlink():
            entry.unlink()
    shutil.rmtree(view)


@contextlib.contextmanager
def run_view(project: Path, text: str | None) -> Iterator[Path]:
    """The folder this run's DVC commands run in: the project itself when the run uses its params.yaml, else a
    view of it whose params.yaml is `text` (see the module docstring). Outputs under a top-level folder the project
    does not have yet are created in the project first, so they land there; anything else new at the view's top
    level is moved into the project when the run ends."""
    from dvc.config import Config
    from dvc.repo import Repo

    view = project / _VIEW
    _remove_view(view)  # a previous run's, if it was killed
    if text is None:
        yield project
        return
    (view / ".dvc").mkdir(parents=True)
    source, target = Config(dvc_dir=str(project / ".dvc"), validate=False), \
        Config(dvc_dir=str(view / ".dvc"), validate=False)
    cache_dir = Repo(str(project), uninitialized=True).cache.local_cache_dir
    for level in ("repo", "local"):  # DVC rewrites relative paths (remote urls, cache dir) for the new location
        conf = source.load_one(level)
        with target.edit(level, validate=False) as edit:
            edit.update(conf)
            if level == "local":
                edit.setdefault("core", {})["no_scm"] = True  # the view has no .git; git stays the project's
                edit.setdefault("cache", {})["dir"] = cache_dir
    for entry in project.iterdir():
        if entry.name not in {".dvc", ".git", "params.yaml"}:
            (view / entry.name).symlink_to(entry)
    (view / "params.yaml").write_text(text)
    try:
        with Repo(str(view)) as repo:
            outs = [str(o.def_path) for stage in repo.index.stages for o in stage.outs]
    except Exception:  # DVC names the problem again, in one line, when the first stage runs
        outs = []
    for out in outs:
        parts = Path(out).parts
        if not Path(out).is_absolute() and len(parts) > 1 and not (view / parts[0]).exists():
            (project / parts[0]).mkdir(parents=True, exist_ok=True)
            (view / parts[0]).symlink_to(project / parts[0])
    try:
        yield view
    finally:
        for entry in view.iterdir():
            if not entry.is_symlink() and entry.name not in {".dvc", "params.yaml"}:
                shutil.move(str(entry), str(project / entry.name))
        _remove_view(view)


@contextlib.contextmanager
def project_lock(project: Path) -> Iterator[None]:
    """One pipeline run per project folder at a time (DVC would otherwise fail half-way on its own lock)."""
    path = project / _LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageFailed(f"another dinov2-pipeline run is using {project}") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _reports_dir(project: Path) -> Path:
    try:
        reports = Path(load_params(project / "params.yaml").reports)
    except Exception:
        reports = Path("reports")
    return reports if reports.is_absolute() else project / reports


def _failure_reason(lines: list[str]) -> str:
    """The most specific one-line reason: the stage command's own `error:` line, else DVC's."""
    own = [ln for ln in lines if ln.startswith("error:")]
    dvc = [ln for ln in lines if ln.startswith("ERROR")]
    return own[0] if own else (dvc[0] if dvc else (lines[-1] if lines else "no output"))


def classify_stage_failure(stage: str, exit_code: int, lines: list[str], stage_exit: int | None = None) -> Exception:
    """Final or transient? ``stage_exit`` is the stage command's own exit code (from the stage run log), ``exit_code``
    DVC's."""
    code, reason = stage_exit, _failure_reason(lines)
    message = f"stage {stage} failed (exit {code if code is not None else exit_code}): {reason}"
    if code in _DETERMINISTIC_EXIT or "data-quality check failed" in reason:
        return StageFailed(message)
    if code == EXIT_TRANSIENT:  # the stage itself says a retry may help (network, S3 outage, throttling)
        return TransientStageError(message)
    return StageFailed(message)  # its own verdict (1: final), or DVC failed before/around the command


# ----------------------------------------------------------------------------------------------- tasks
@task(task_run_name="dvc repro {stage}", retries=2, retry_delay_seconds=[5, 20],
      retry_condition_fn=_retry_transient, log_prints=True)
def run_dvc_stage(stage: str, project_dir: str, force: bool = False, credentials_block: str | None = None,
                  round_: str | None = None) -> dict:
    """`dvc repro <stage>` (in a later curation-loop round: its `<stage>-round@<round>`) with its output in the
    task's logs; publishes the stage's GX result and metrics."""
    logger = get_run_logger()
    project = Path(project_dir)
    reports = _reports_dir(project) / round_ if round_ else _reports_dir(project)
    target = dvc_stage(stage, round_) if round_ else stage
    label = f"{stage}-{round_}" if round_ else stage  # artifact keys
    run_log = project / ".dvc" / "tmp" / f"stage-runs-{uuid.uuid4().hex}.txt"
    env = _env({**_block_env(project, credentials_block), STAGE_RUN_LOG_ENV: str(run_log)})
    locked_before = _lock_entry(project, target)
    cmd = [_dvc(), "repro", target] + (["--force"] if force else [])
    start = time.perf_counter()
    started_at = time.time()
    run_log.parent.mkdir(parents=True, exist_ok=True)
    try:
        code, lines, _ = _stream(cmd, project, env, logger, relay=ProgressRelay(report=progress_publisher(label)))
        ran, exits = read_stage_runs(run_log)
    finally:
        run_log.unlink(missing_ok=True)
    seconds = round(time.perf_counter() - start, 2)
    gx_files = validation_files(reports, stage, set(STAGES) - {stage})
    gx_markdown = validation_markdown(stage, gx_files)
    if code != 0:
        fresh = [p for p in gx_files if p.stat().st_mtime >= started_at - 1]  # not a previous run's report
        if fresh:
            publish("validation", f"{label}-validation", validation_markdown(stage, fresh),
                    f"{label}: great-expectations results (failed run)")
        failed = next((s for s in reversed(ran) if exits.get(s, 0) != 0), target)  # it, or an upstream stage
        raise classify_stage_failure(failed, code, lines, stage_exit=exits.get(failed))
    if target in ran:
        status = "yes"
    elif _lock_entry(project, target) != locked_before:  # DVC brought it up to date without running its command
        status = "restored from run-cache"
    else:
        status = "skipped (up to date)"
    also_ran = list(dict.fromkeys(s for s in ran if s != target))
    note = "" if status == "yes" else " (unchanged since the run that produced it)"
    if gx_markdown:
        publish("validation", f"{label}-validation", gx_markdown, f"{label}: great-expectations results{note}")
    metrics_path = reports / "metrics" / f"{stage}.json"
    markdown = metrics_markdown(stage, metrics_path)
    if markdown:
        publish("metrics", f"{label}-metrics", markdown, f"{label}: metrics{note}")
    summary = summary_markdown(stage, reports)
    if summary:
        publish("summary", f"{label}-summary", summary, f"{label}: summary and figures{note}")
    figures = figures_markdown(stage, reports)
    if figures:
        publish("figures", f"{label}-figures", figures, f"{label}: figures{note}")
    table = metrics_table(metrics_path)
    if table:
        publish_table(f"{label}-table", table, f"{label}: summary table{note}")
    warnings = metric_warnings(metrics_path)
    for w in warnings:
        logger.warning(w)
    return {"stage": target, "ran": status == "yes", "status": status, "seconds": seconds,
            "also_ran": also_ran, "validation": validation_summary(gx_files),
            "metrics": headline_metrics(metrics_path), "warnings": warnings}


def read_stage_runs(path: Path) -> tuple[list[str], dict[str, int]]:
    """(stages whose command started, in order; exit code of each that ended) from a stage run log
    (:data:`flows.cli.STAGE_RUN_LOG_ENV`). A stage killed before it could write its exit has none."""
    ran: list[str] = []
    exits: dict[str, int] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        if len(parts) == 2 and parts[1] == "start":
            ran.append(parts[0])
        elif len(parts) == 3 and parts[1] == "exit" and parts[2].lstrip("-").isdigit():
            exits[parts[0]] = int(parts[2])
    return ran, exits


def _lock_entry(project: Path, stage: str) -> dict | None:
    """The stage's entry in dvc.lock (hashes of its deps, params and outs); None before its first run."""
    lock = project / "dvc.lock"
    if not lock.exists():
        return None
    return ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get(stage)


def _block_env(project: Path, credentials_block: str | None) -> dict[str, str]:
    creds = credentials_from_block(credentials_block)
    return RemoteSpec("block", "s3://unused").with_credentials(creds).subprocess_env() if creds else {}


def _remote_spec(project: Path, remote: str | None, credentials_block: str | None) -> RemoteSpec | None:
    spec = resolve_remote(project, remote)
    if spec is None:
        return None
    return spec.with_credentials(credentials_from_block(credentials_block))


@task(task_run_name="dvc push to {remote}", retries=3, retry_delay_seconds=[10, 20, 40],
      retry_condition_fn=_retry_transient)
def dvc_push(project_dir: str, remote: str, credentials_block: str | None = None) -> dict:
    """`dvc push` of every cached stage output. DVC uploads content-addressed objects (a directory's `.dir`
    listing last), each with one whole-object PUT, so an interrupted push leaves only complete objects and a
    retry uploads just what is missing."""
    logger = get_run_logger()
    project = Path(project_dir)
    try:
        spec = _remote_spec(project, remote, credentials_block)
    except RemoteError as exc:
        raise StageFailed(str(exc)) from None
    assert spec is not None
    start = time.perf_counter()
    result_file = project / ".dvc" / "tmp" / f"push-{uuid.uuid4().hex}.json"
    cmd = [_cli(), "push", "--remote", spec.name, "--project", str(project), "--result", str(result_file)]
    code, lines, aborted = _stream(cmd, project, _env(spec.subprocess_env()), logger,
                                   reachable=endpoint_reachable(spec))
    seconds = round(time.perf_counter() - start, 2)
    try:
        pushed = json.loads(result_file.read_text())["pushed"] if code == 0 else 0
    finally:
        result_file.unlink(missing_ok=True)
    if code != 0:
        reason = next((ln.removeprefix("error: ") for ln in lines if ln.startswith("error:")),
                      lines[-1] if lines else "no output")
        where = f"remote '{spec.name}' ({spec.url})"
        if aborted:
            raise TransientStageError(f"dvc push to {where} stopped: the remote became unreachable; will retry")
        if code == EXIT_CREDENTIALS:
            raise CredentialsRejected(reason)
        if code == 1:
            raise StageFailed(reason)
        raise TransientStageError(f"{reason[:300]}; will retry")
    return {"remote": spec.name, "url": spec.url, "pushed": pushed, "seconds": seconds}


@task(task_run_name="run record to {remote}", retries=3, retry_delay_seconds=[5, 10, 20],
      retry_condition_fn=_retry_transient)
def publish_run_record(project_dir: str, remote: str, run_id: str, summary: dict,
                       credentials_block: str | None = None) -> str:
    """dvc.lock, dvc.yaml, the params used, metrics and GX results under `<remote>/runs/<run id>/`, so any
    run's artifacts can be fetched by run id (`dinov2-pipeline fetch --run`) even without a git commit."""
    project = Path(project_dir)
    spec = _remote_spec(project, remote, credentials_block)
    assert spec is not None
    reports = _reports_dir(project)
    files: dict[str, bytes] = {}
    for name in ("dvc.lock", "dvc.yaml", "params.yaml"):
        if (project / name).exists():
            files[name] = (project / name).read_bytes()
    for sub in ("metrics", "validation"):
        for path in sorted((reports / sub).glob("*.json")) if (reports / sub).is_dir() else []:
            files[f"reports/{sub}/{path.name}"] = path.read_bytes()
    files["summary.json"] = (json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n").encode()
    try:
        store = RemoteStore(spec)
        for rel, data in files.items():
            store.write(spec.key("runs", run_id, rel), data)
        store.write(spec.key("runs", "latest.json"),
                    json.dumps({"run_id": run_id, "finished": summary.get("finished")}).encode())
    except CredentialsRejected:
        raise
    except RemoteError as exc:
        if exc.transient:
            raise TransientStageError(str(exc)) from None
        raise StageFailed(str(exc)) from None
    return spec.uri(spec.key("runs", run_id))


# ----------------------------------------------------------------------------------------------- the flow
class _NoTracebackForKnownFailures(logging.Filter):
    """Prefect logs the exception a flow ends with, traceback included. For the pipeline's own failures (a stage's,
    a push's, bad params) the message already names the cause and the fix, and the traceback only walks Prefect's
    engine: some 70 lines on the terminal and in the UI above the one line that matters. Anything else keeps it, and
    so does every failure with DINOV2_DEBUG=1."""

    def filter(self, record: logging.LogRecord) -> bool:
        known = record.exc_info and isinstance(record.exc_info[1], (StageFailed, TransientStageError, RemoteError))
        if known and not os.environ.get("DINOV2_DEBUG"):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_known_failures() -> None:
    """Install the filter on Prefect's flow-run logger (once per process: the flow body runs under Prefect's
    logging set-up, whether started from the CLI or by a worker)."""
    flow_runs = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, _NoTracebackForKnownFailures) for f in flow_runs.filters):
        flow_runs.addFilter(_NoTracebackForKnownFailures())


def _summary_table(results: list[dict]) -> str:
    lines = ["| stage | ran | seconds | data quality | metrics |", "|---|---|---|---|---|"]
    for r in results:
        ran = r["status"] + (f" (+ upstream {', '.join(r['also_ran'])})" if r.get("also_ran") else "")
        lines.append(f"| {r['stage']} | {ran} | {r['seconds']} | {r['validation']} | {r['metrics']} |")
    warnings = [w for r in results for w in r.get("warnings", [])]
    return "\n".join(lines) + "".join(f"\n\n> WARNING: {w}" for w in warnings)


def _experiment_name(flow_run_name: str | None, started: str) -> str:
    """A git-ref-safe name: the flow run's (Prefect's `adjective-animal`), else the start time."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", flow_run_name or f"run-{started}").strip("-")


@task(task_run_name="dvc exp save {name}")
def save_run_experiment(project_dir: str, name: str, stages: list[str], params_text: str | None) -> str | None:
    """The run as a DVC experiment (flows/experiments.py). Not saving one never fails a run that succeeded: the
    reason is logged in one line."""
    logger = get_run_logger()
    try:
        ref = save_experiment(Path(project_dir), name, stages, params_text)
    except NoExperiment as exc:
        logger.info("not saved as a DVC experiment: %s", exc)
        return None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        logger.warning("not saved as a DVC experiment (%s): %s", type(exc).__name__, first)
        return None
    logger.info("saved as DVC experiment '%s' (`dvc exp show`, `dvc plots diff %s <other>`)", name, name)
    return ref


def _git_rev(project: Path) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


@flow(name="curation-round", flow_run_name="{round_}", log_prints=True)
def curation_round(round_: str, project_dir: str, force: bool, credentials_block: str | None, retries: int,
                   delays: list[float]) -> list[dict]:
    """A later round of the curation loop (tasks/loop.py): retrieval with the previous round's teacher, shards,
    pre-training and evaluation, each a `dvc repro` task, then the round-against-round table as an artifact."""
    _quiet_known_failures()
    task_ = run_dvc_stage.with_options(retries=retries, retry_delay_seconds=delays or 0, retry_jitter_factor=0.2,
                                       task_run_name=f"dvc repro {{stage}} ({round_})")
    results = [task_(stage, project_dir, force, credentials_block, round_) for stage in ROUND_STAGES]
    table = _reports_dir(Path(project_dir)) / round_ / "loop.md"
    if table.is_file():
        publish("summary", f"loop-{round_}", table.read_text(), f"curation loop up to {round_}: round against round")
    return results


@flow(name="dinov2-pipeline", log_prints=True)
def dinov2_pipeline(
    stages: list[str] | None = None,
    overrides: list[str] | None = None,
    profile: str = "params.yaml",
    project_dir: str = ".",
    force: bool = False,
    push: bool = True,
    remote: str | None = None,
    credentials_block: str | None = None,
    retries: int = 3,
    retry_delay_s: float = 10.0,
    experiment: bool = True,
    rounds: int | None = None,
) -> dict:
    """Run the selected stages (default: all, in DAG order) as `dvc repro <stage>` tasks, then `dvc push`.

    Args:
        stages: stage names to run (default all); planned-but-missing names are ignored with a warning.
        overrides: params overrides `section.key=value` (like `-S ingest.workers=2`), validated first.
        profile: params file the run starts from (`params.yaml` or `params.paper.yaml`), relative to the project.
        project_dir: folder holding dvc.yaml (the worker's working directory by default).
        force: rerun stages even when DVC says they are up to date.
        push: `dvc push` to the remote at the end (only when a remote is configured or named).
        remote: DVC remote name (default: the project's default remote).
        credentials_block: Prefect Secret block with S3 credentials (JSON aws_access_key_id/aws_secret_access_key);
            default: the environment or the remote's `dvc remote modify --local` settings.
        retries: retries per stage/push for transient faults (network, S3); deterministic failures never retry.
        retry_delay_s: first back-off delay; doubles on each retry.
        experiment: save the run as a DVC experiment named after the flow run (`dvc exp show`, `dvc plots diff`),
            when the project is a git repository with a commit.
        rounds: curation-loop rounds (tasks/loop.py): 2 and more re-curate with the previous round's teacher,
            train and evaluate again, each later round a sub-flow; None: `loop.rounds` of the params.
    """
    from prefect.runtime import flow_run

    _quiet_known_failures()
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    overrides = list(overrides or [])
    if rounds is not None:
        try:
            base = load_params(project / profile, overrides)
            overrides.append(rounds_setting(rounds, base.pretrain.out, base.loop.out))
        except (ParamsError, ValueError) as exc:
            raise StageFailed(f"params: {exc}") from None
    selected, ignored = select_stages(stages, project_stages(project))
    if ignored:
        logger.warning("not in this project's registry/dvc.yaml yet, ignored: %s", ", ".join(ignored))
    params_text, run_params = resolve_run_params(project, profile, overrides)
    spec = _remote_spec(project, remote, credentials_block) if push else None
    if push and spec is None:
        logger.info("no DVC remote configured: outputs stay in the local DVC cache (`dvc remote add -d ...`)")
    delays = backoff(retries, retry_delay_s)
    stage_task = run_dvc_stage.with_options(retries=retries, retry_delay_seconds=delays or 0,
                                            retry_jitter_factor=0.2)
    push_task = dvc_push.with_options(retries=retries, retry_delay_seconds=delays or 0, retry_jitter_factor=0.2)
    record_task = publish_run_record.with_options(retries=retries, retry_delay_seconds=delays or 0)

    run_id = str(flow_run.id or "local")
    started = datetime.now(UTC).isoformat(timespec="seconds")
    results: list[dict] = []
    pushed: dict | None = None
    record: str | None = None
    with project_lock(project), run_view(project, params_text) as where:
        for stage in selected:
            results.append(stage_task(stage, str(where), force, credentials_block))
        if not stages:  # a stage selection runs round 1's stages only
            for name in run_params.loop.rounds:
                results += curation_round(name, str(where), force, credentials_block, retries, delays)
        summary = _summary_table(results)
        publish("summary", "pipeline-summary", summary, "stages run by this flow run")
        if spec is not None:
            pushed = push_task(str(where), spec.name, credentials_block)
            payload = {"flow_run_id": run_id, "flow_run_name": flow_run.name, "started": started,
                       "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                       "git_rev": _git_rev(project), "profile": profile, "overrides": overrides,
                       "stages": results, "push": pushed}
            record = record_task(str(where), spec.name, run_id, payload, credentials_block)
        later = [dvc_stage(s, name) for name in run_params.loop.rounds for s in ROUND_STAGES] if not stages else []
        exp_ref = save_run_experiment(str(project), _experiment_name(flow_run.name, started), [*selected, *later],
                                      params_text) if experiment else None
        outputs = [o for s in selected for o in project_outputs(where).get(s, [])]
        urls = remote_urls(where, [o.path for o in outputs if o.cached], spec) if pushed and spec else {}
        publish("outputs", "pipeline-outputs",
                f"### outputs\n\n{outputs_markdown(outputs, spec, pushed is not None, urls)}\n\n"
                + (f"Pushed {pushed['pushed']} new object(s) to `{spec.url}` in {pushed['seconds']} s. "
                   if pushed and spec else "")
                + (f"Run record: `{record}`" if record else ""),
                "stage outputs, their hashes and where they live")
    return {"success": True, "stages": results, "summary": summary, "push": pushed, "run_record": record,
            "run_id": run_id, "ignored": ignored, "experiment": exp_ref}
