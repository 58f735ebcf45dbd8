"""A training run that stops before its end: kill -9 then resume on the same curve, checkpoints on S3 that a fresh
run resumes from, an unreachable checkpoint store and a non-finite loss, each one line. Apart from
test_train_stages.py so that pytest-xdist can give the files to different workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from .test_train_stages import ROOT, load_full, read_log


def _start_stage_process(params, params_file: Path) -> subprocess.Popen:
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    code = ("import sys; from tasks.params import load_params; from tasks.pretrain import run_pretrain; "
            f"run_pretrain(load_params({str(params_file)!r}))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_it(train_params, fmnist_shards, tmp_path, capfd):
    """Saving is atomic, but a checkpoint can be damaged afterwards (a disk, a copy): the rerun resumes from the newest
    one that loads, says which one it skipped and why, and trains the iterations after it again. Before, the rank
    died on DCP's CheckpointException (a BaseException) with 50 lines and no reason for the stage."""
    from tasks.pretrain import run_pretrain

    params = train_params("pretrain", fmnist_shards, steps=4, every=1)
    run_pretrain(params)
    out = Path(params.pretrain.out)
    newest = max((out / "run" / "checkpoints").glob("step_*"))
    assert newest.name == "step_00000004"
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capfd.readouterr()
    metrics = run_pretrain(params)  # the same stage call
    err = capfd.readouterr().err
    assert "step_00000004 cannot be read (RuntimeError: PytorchStreamReader failed" in err, err[-3000:]
    assert "resumed from" in err and "step_00000003 (iteration 3)" in err, err[-3000:]
    assert metrics["summary"]["resumed_from"] == 3 and metrics["summary"]["iterations_run"] == 1
    assert read_log(out)["step"].tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_kill_9_then_resume_continues_the_same_curve(train_params, fmnist_shards, tmp_path):
    from tasks.pretrain import run_pretrain

    extra = ["model.drop_path_rate=0.2", "pretrain.data.num_workers=2"]  # RNG in the step; worker processes
    steps, every = 24, 4
    ref = train_params("pretrain", fmnist_shards, steps=steps, out=tmp_path / "ref", every=every, extra=extra)
    run_pretrain(ref)
    victim = train_params("pretrain", fmnist_shards, steps=steps, out=tmp_path / "victim", every=every, extra=extra)
    out = Path(victim.pretrain.out)
    proc = _start_stage_process(victim, tmp_path / "victim.yaml")
    log_file = out / "run" / "log.csv"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        ckpts = list((out / "run" / "checkpoints").glob("step_*"))
        rows = len(log_file.read_text().splitlines()) - 1 if log_file.exists() else 0
        if ckpts and rows >= every + 2:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage, torchrun, its worker and the data workers
            killed_at = rows
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert killed_at is not None, f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert not (out / "export" / "summary.json").exists()

    metrics = run_pretrain(victim)  # the same stage call resumes
    resumed_from = metrics["summary"]["resumed_from"]
    assert resumed_from >= every and resumed_from % every == 0
    a, b = read_log(Path(ref.pretrain.out)), read_log(out)
    assert list(b["step"]) == list(range(steps))
    for col in ("loss_total", "loss_dino", "loss_ibot", "loss_koleo", "lr", "teacher_temp"):
        np.testing.assert_allclose(b[col], a[col], rtol=1e-4, atol=1e-5, err_msg=col)
    # the DVCLive copy of the curve too: the rows the killed run logged past its checkpoint were dropped on resume
    live = pd.read_csv(Path(victim.reports, "dvclive", "pretrain", "plots", "metrics", "loss_total.tsv"), sep="\t")
    assert list(live["step"]) == list(range(steps))
    np.testing.assert_allclose(live["loss_total"], b["loss_total"], rtol=1e-4)
    sa, sb = load_full(Path(ref.pretrain.out)), load_full(out)
    for k, v in sa["teacher"].items():
        torch.testing.assert_close(sb["teacher"][k], v, atol=1e-5, rtol=1e-4)
    print(f"killed after {killed_at} logged iterations, resumed from {resumed_from}; same curve over {steps}")


@pytest.mark.slow
def test_checkpoints_on_s3_let_a_fresh_run_resume(train_params, fmnist_shards, tmp_path, s3_bucket, s3_env):
    """checkpoint.dir on a real S3-compatible server, 2 ranks writing their shards: nothing on the local disk, and a
    run whose last save never committed (no meta.json) resumes, in new torchrun processes, from the last committed
    step on the same curve."""
    import boto3

    from tasks.pretrain import run_pretrain

    root = f"s3://{s3_bucket}/ckpt/pretrain"
    steps, every = 6, 2
    two = ["launch.nproc_per_node=2"]
    ref = train_params("pretrain", fmnist_shards, steps=steps, out=tmp_path / "ref", every=every, extra=two)
    run_pretrain(ref)
    p = train_params("pretrain", fmnist_shards, steps=steps, out=tmp_path / "s3run", every=every,
                     extra=[*two, f"pretrain.checkpoint.dir={root}", "pretrain.checkpoint.keep=3"])
    first = run_pretrain(p)
    out = Path(p.pretrain.out)
    assert first["summary"]["resumed_from"] == 0 and not (out / "run" / "checkpoints").exists()
    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="ckpt/pretrain/")["Contents"]}
    assert {f"ckpt/pretrain/step_{n:08d}/{f}" for n in (2, 4, 6) for f in ("meta.json", "rng_rank0.pt",
                                                                         "rng_rank1.pt")} <= keys

    # as if killed while saving iteration 6: its shards are there, its commit marker is not
    s3.delete_object(Bucket=s3_bucket, Key="ckpt/pretrain/step_00000006/meta.json")
    (out / "export" / "summary.json").unlink()
    second = run_pretrain(p)
    assert second["summary"]["resumed_from"] == 4
    a, b = read_log(Path(ref.pretrain.out)), read_log(out)
    assert list(b["step"]) == list(range(steps))
    np.testing.assert_allclose(b["loss_total"], a["loss_total"], rtol=1e-4, atol=1e-5)
    for k, v in load_full(Path(ref.pretrain.out))["teacher"].items():
        torch.testing.assert_close(load_full(out)["teacher"][k], v, atol=1e-5, rtol=1e-4)


def test_unreachable_checkpoint_store_is_one_line_before_any_worker_starts(train_params, fmnist_shards, tmp_path,
                                                                            monkeypatch):
    import socket

    from tasks.pretrain import run_pretrain
    from tasks.storage import StorageError

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    p = train_params("pretrain", fmnist_shards, steps=2, extra=[
        "pretrain.checkpoint.dir=s3://nowhere/ckpt", f"storage.s3_endpoint_url={dead}"])
    with pytest.raises(StorageError) as err:
        run_pretrain(p)
    msg = str(err.value)
    assert "\n" not in msg and "s3://nowhere/ckpt" in msg and "network error" in msg and err.value.transient
    assert not (Path(p.pretrain.out) / "run" / "log.csv").exists()  # no worker ran


@pytest.mark.slow
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_checkpoint(train_params, fmnist_shards, tmp_path,
                                                                         monkeypatch):
    from dinov2_core.train.engine import FAULT_ENV
    from tasks.pretrain import run_pretrain
    from tasks.train_launch import TrainingFailed

    monkeypatch.setenv(FAULT_ENV, "5")
    p = train_params("pretrain", fmnist_shards, steps=8, every=2)
    with pytest.raises(TrainingFailed) as err:
        run_pretrain(p)
    msg = str(err.value)
    assert "\n" not in msg and "non-finite loss at iteration 5" in msg and "step_00000004" in msg, msg
    ckpts = Path(p.pretrain.out) / "run" / "checkpoints"
    assert sorted(x.name for x in ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]
    assert not (Path(p.pretrain.out) / "export" / "summary.json").exists()
