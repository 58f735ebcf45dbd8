"""The launcher side of the training stages (pretrain, adapt, distill): params -> the library's configs, input
checks, and ``torchrun`` around ``tasks/train_worker.py``, whose ranks run :func:`dinov2_core.train.engine.run_training`.
A worker failure comes back as one line (``TrainingFailed``), a killed stage never leaves workers behind.

    <out>/run/params.yaml          the resolved params the workers read (the rest of <out>: see the engine)
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from dinov2_core.config import DataConfig, MultiCropConfig
from dinov2_core.train.engine import TrainSpec, run_training
from tasks.log import get_logger, progress_kwargs
from tasks.params import Params, ParamsError
from tasks.sections import LaunchParams
from tasks.storage import Storage, scheme_of
from tasks.tracking import stage_sinks
from tasks.validation import TableCheck

log = get_logger("train")

ROOT = Path(__file__).resolve().parents[1]


def stage_code(stage_file: str) -> tuple[Path, ...]:
    """The stage code that shapes a run besides the library's (part of the resume digest, with dinov2_core's)."""
    return (Path(__file__).resolve(), Path(stage_file).resolve())


class TrainingFailed(RuntimeError):
    """The torchrun workers failed; the message is the one line the failing rank wrote. `transient`: a retry may
    succeed (the CLI exits 75 and the flow retries)."""

    transient = False


# the second line of <out>/run/failure.txt when the failing rank lost its peers (tasks/train_worker.py)
TRANSIENT_MARK = "transient: a peer process or node was lost; a rerun resumes from the last complete checkpoint"


# ============================================================================================== input checks
def check_crops(section: str, crops: MultiCropConfig, patch_size: int) -> None:
    try:
        crops.check_patch_multiple(patch_size)
    except ValueError as exc:
        raise ParamsError(f"{section}.{exc}") from None


def check_batch(section: str, data: DataConfig, launch: LaunchParams) -> None:
    world = launch.nproc_per_node * launch.nnodes
    if data.global_batch_size % world:
        raise ParamsError(f"{section}.data.global_batch_size: {data.global_batch_size} is not divisible by the "
                          f"{world} training processes")
    if data.streams % world or data.global_batch_size % data.streams:
        raise ParamsError(f"{section}.data.streams: {data.streams} must be a multiple of the {world} training "
                          f"processes and divide global_batch_size ({data.global_batch_size})")
    per_rank = data.streams // world
    if data.num_workers and per_rank % data.num_workers:
        # the loader deals whole streams to its processes: the rest would silently be fewer workers (gcd)
        raise ParamsError(f"{section}.data.num_workers: {data.num_workers} loader processes cannot share the {per_rank} "
                          f"shard stream(s) of each training process ({section}.data.streams {data.streams} / {world} "
                          f"processes); make streams a multiple of {world * data.num_workers} that divides "
                          f"global_batch_size ({data.global_batch_size}), or num_workers a divisor of {per_rank}")


# ============================================================================================== launcher
def _omp_threads(launch: LaunchParams) -> int:
    if launch.omp_threads:
        return launch.omp_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // launch.nproc_per_node)


def torchrun_command(stage: str, params_file: Path, launch: LaunchParams) -> list[str]:
    """One node: `--standalone`. Several: c10d rendezvous at master_addr:master_port, hosted by node 0 (set
    explicitly: on one machine, or behind a Service name, every node would otherwise think it is the host)."""
    cmd = [sys.executable, "-m", "tasks.torchrun", "--nproc_per_node", str(launch.nproc_per_node)]
    if launch.nnodes == 1 and launch.master_port == 0:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(launch.nnodes), "--node_rank", str(launch.node_rank),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{launch.master_addr}:{launch.master_port}",
                "--rdzv_id", f"dinov2-{stage}", "--rdzv_conf", f"is_host={int(launch.node_rank == 0)}"]
    return cmd + ["-m", "tasks.train_worker", stage, "--params", str(params_file)]


def is_main_node(launch: LaunchParams) -> bool:
    """Node 0 writes the stage's reports; the other nodes of a multi-node run only run their workers."""
    return launch.node_rank == 0


def launch_workers(stage: str, params: Params, out: Path, extra_env: dict[str, str] | None = None) -> Path:
    """Write the resolved params under ``<out>/run``, run the torchrun workers, return the run folder.

    Raises TrainingFailed with the failing rank's one-line reason.
    """
    ckpt_dir = getattr(params, stage).checkpoint.dir
    if ckpt_dir and scheme_of(ckpt_dir) != "local":
        # before any worker starts: an unreachable store or rejected keys is one line here, not N rank tracebacks
        Storage.from_params(params.storage).exists(ckpt_dir)
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    # every node of a multi-node run writes its own (node_rank differs); on a shared volume one file would race
    params_file = run_dir / ("params.yaml" if params.launch.nnodes == 1 else f"params.node{params.launch.node_rank}.yaml")
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    failure = run_dir / "failure.txt"
    failure.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(extra_env or {})
    env["OMP_NUM_THREADS"] = str(_omp_threads(params.launch))
    if params.launch.nproc_per_node > 1 or getattr(params, stage).data.num_workers > 0:
        # busy-waiting OpenMP threads stall cores shared with other ranks or loader workers; alone, spinning is
        # faster (one process, 2 threads, no workers: 0.445 vs 0.522 s per default-profile step)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TORCHELASTIC_ERROR_FILE", str(run_dir / "torchelastic_error.json"))
    cmd = torchrun_command(stage, params_file, params.launch)
    log.info("%s: %s", stage, " ".join(cmd[2:]))
    try:  # worker output joins the stage's stderr (progress bars, logs); stdout stays clean for callers
        stdout = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        stdout = None
    proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), stdout=stdout, preexec_fn=die_with_parent)  # noqa: PLW1509
    try:
        code = proc.wait()
    except BaseException:  # Ctrl-C or a Prefect cancel: do not leave workers behind
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code != 0:
        lines = failure.read_text().strip().splitlines() if failure.exists() else []
        several_nodes = params.launch.nnodes > 1
        error = TrainingFailed(lines[0] if lines else f"{stage}: torchrun exited with code {code}"
                               + (" (a node was lost?)" if several_nodes else " (see the log above)"))
        # a peer that vanished (a lost node, a broken connection, a collective timeout) is worth a retry: the rerun
        # resumes from the last complete checkpoint; so is a multi-node agent that failed without a worker's word
        error.transient = TRANSIENT_MARK in lines[1:] or (several_nodes and not lines)
        raise error
    return run_dir


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (call it in the child), so a killed stage never
    leaves training behind."""
    try:

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: S110 - best effort (non-Linux)
        pass


# ============================================================================================== worker
def storage_opener(params: Params):
    return Storage.from_params(params.storage).open_read


def run_worker(spec: TrainSpec, params: Params) -> dict[str, Any]:
    """One torchrun process of a training stage: the library's engine with the project's storage and logging."""
    storage = Storage.from_params(params.storage)
    ckpt_root = spec.checkpoint_dir or str(spec.out / "run" / "checkpoints")
    return run_training(spec, params.launch, opener=storage.open_read,
                        storage_options=storage.fsspec_options(str(ckpt_root)), progress_kwargs=progress_kwargs(),
                        sinks=stage_sinks(params.tracking, params.reports, spec.stage))


# ============================================================================================== inputs
def read_shard_index_table(index_url: str, params: Params):
    """The shard index as a table (name, count, bytes), read through the project's storage."""
    storage = Storage.from_params(params.storage)
    if not storage.exists(index_url):
        raise FileNotFoundError(f"shard index {index_url} not found (run the shards stage or set *.data.shards)")
    raw = storage.read_bytes(index_url)
    index = json.loads(raw)
    frame = pd.DataFrame(index.get("shards", []), columns=["name", "count", "bytes", "sha256"])
    return frame, hashlib.sha256(raw).hexdigest()


def shard_index_checks(frame, global_batch_size: int):
    """GX suite of what a training stage receives: well-formed shard names, non-empty shards, enough images."""
    import great_expectations.expectations as gxe

    return [TableCheck("shard_index", frame, [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToMatchRegex(column="name", regex=r"^shard-\d{6}\.tar$"),
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1),
        gxe.ExpectColumnSumToBeBetween(column="count", min_value=global_batch_size),
    ])]
