"""Two "nodes" of one training run (one process each, c10d rendezvous on loopback), as the Indexed Job's pods run
it: the same step as one process, and a lost node fails the run as transient and the rerun resumes. Apart from
test_train_stages.py so that pytest-xdist can give the two files to different workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.stack import free_port

from .test_train_stages import ROOT, load_full, read_log


def _start_node(params, params_file: Path) -> subprocess.Popen:
    """One "node": the stage through the CLI, as a pod of the Indexed Job runs it."""
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([str(Path(sys.executable).parent / "dinov2-pipeline"), "stage", "pretrain", "--params",
                             str(params_file)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _two_nodes(train_params, shards, tmp_path, out: Path, steps: int, extra: list[str], **kw):
    """Node 0 and node 1 of one run (one process each), c10d rendezvous on loopback."""
    port = free_port()
    nodes = []
    for rank in (0, 1):
        p = train_params("pretrain", shards, steps=steps, out=out, extra=extra + [
            "launch.nnodes=2", f"launch.node_rank={rank}", "launch.master_addr=127.0.0.1",
            f"launch.master_port={port}", "launch.timeout_s=60"], **kw)
        nodes.append(_start_node(p, tmp_path / f"{out.name}-node{rank}.yaml"))
    return nodes


@pytest.mark.slow
def test_two_nodes_reach_the_first_step_of_one_process(train_params, fmnist_shards, tmp_path):
    """`--nnodes 2 --node_rank 0/1` with one process each (two "nodes" on loopback): the same losses and weights
    after the first step as one process; node 0 alone writes the reports."""
    from tasks.pretrain import run_pretrain

    extra = ["pretrain.loss.koleo_loss_weight=0", "model.drop_path_rate=0", "pretrain.optim.warmup_epochs=0",
             "pretrain.optim.base_lr=0.05"]
    one = train_params("pretrain", fmnist_shards, steps=1, out=tmp_path / "one", batch=8, extra=extra)
    run_pretrain(one)
    nodes = _two_nodes(train_params, fmnist_shards, tmp_path, tmp_path / "two", 1, extra, batch=8)
    for rank, proc in enumerate(nodes):
        assert proc.wait(timeout=600) == 0, f"node {rank}: {proc.stderr.read()[-2000:]}"
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for col in ("loss_total", "loss_dino", "loss_ibot"):
        assert b[col][0] == pytest.approx(a[col][0], rel=1e-5, abs=1e-6), col
    sa, sb = load_full(tmp_path / "one"), load_full(tmp_path / "two")
    worst = max(float((v - sb[part][k]).abs().max()) for part in ("student", "teacher") for k, v in sa[part].items())
    assert worst < 1e-2 * 0.05 * (8 / 1024) ** 0.5  # the bound of the 2-process test above (float reduction order)
    assert json.loads((tmp_path / "two" / "export" / "summary.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "two" / "run").glob("params*.yaml")) == \
        ["params.node0.yaml", "params.node1.yaml"]


@pytest.mark.slow
def test_a_lost_node_fails_the_run_as_transient_and_the_rerun_resumes(train_params, fmnist_shards, tmp_path):
    """Killing node 1 mid-run: node 0's stage fails with one line and exit 75 (a retry may help); both nodes
    started again resume from the last complete checkpoint and finish the same iteration count."""
    steps, every = 12, 4
    out = tmp_path / "run"
    extra = ["pretrain.data.num_workers=0"]
    node0, node1 = _two_nodes(train_params, fmnist_shards, tmp_path, out, steps, extra, every=every)
    log_file = out / "run" / "log.csv"
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and node0.poll() is None and node1.poll() is None:
        done = list((out / "run" / "checkpoints").glob("step_*/meta.json"))
        rows = len(log_file.read_text().splitlines()) - 1 if log_file.exists() else 0
        if done and rows >= every + 2:
            os.killpg(node1.pid, signal.SIGKILL)  # the node: its stage, torchrun agent and worker
            killed = True
            break
        time.sleep(0.05)
    assert killed, f"run ended before node 1 could be killed: {node0.stderr.read()[-2000:]}"
    node1.wait(timeout=30)
    code = node0.wait(timeout=240)
    lines = [line for line in node0.stderr.read().splitlines() if line.startswith("error:")]
    assert code == 75, (code, lines)
    assert len(lines) == 1, lines
    assert not (out / "export" / "summary.json").exists()

    again = _two_nodes(train_params, fmnist_shards, tmp_path, out, steps, extra, every=every)
    for rank, proc in enumerate(again):
        assert proc.wait(timeout=600) == 0, f"node {rank}: {proc.stderr.read()[-2000:]}"
    summary = json.loads((out / "export" / "summary.json").read_text())
    assert summary["resumed_from"] >= every and summary["resumed_from"] % every == 0
    assert list(read_log(out)["step"]) == list(range(steps))
    print(f"node 1 killed; node 0 failed with: {lines[0]}; resumed from {summary['resumed_from']}")
