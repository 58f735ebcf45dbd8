"""Experiment tracking: DVCLive (always) and TensorBoard (a param) receive every step, a resumed run never logs a
step twice, and a flow run becomes a DVC experiment that `dvc exp show` lists with the params it really used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from flows.experiments import NoExperiment, save_experiment
from tasks.sections import TrackingParams
from tasks.tracking import DvcLiveSink, TensorBoardSink, stage_sinks, track_results

from .conftest import project_env

BIN = Path(sys.executable).parent


def _run_steps(sink, start: int, stop: int) -> None:
    sink.open(start)
    for step in range(start, stop):
        sink.log({"loss_total": 10.0 - step, "lr": 0.1}, step)
    sink.close()


def test_dvclive_resume_drops_what_a_killed_run_logged_past_its_checkpoint(tmp_path):
    folder = tmp_path / "dvclive" / "pretrain"
    _run_steps(DvcLiveSink(folder), 0, 7)  # "killed" after logging step 6
    _run_steps(DvcLiveSink(folder), 4, 10)  # resumed from the checkpoint at 4
    tsv = pd.read_csv(folder / "plots" / "metrics" / "loss_total.tsv", sep="\t")
    assert list(tsv["step"]) == list(range(10))
    assert list(tsv["loss_total"]) == [10.0 - s for s in range(10)]
    assert json.loads((folder / "metrics.json").read_text()) == {"loss_total": 1.0, "lr": 0.1, "step": 9}
    _run_steps(DvcLiveSink(folder), 0, 3)  # a fresh run (new configuration) starts clean
    assert list(pd.read_csv(folder / "plots" / "metrics" / "loss_total.tsv", sep="\t")["step"]) == [0, 1, 2]


def test_dvclive_resume_survives_a_summary_a_kill_left_half_written(tmp_path):
    """CI saw it: SIGKILL while DVCLive rewrote metrics.json left it empty, and the resumed run died on
    "JSONDecodeError". The summary is now replaced atomically, and one that does not parse is started afresh."""
    folder = tmp_path / "dvclive" / "pretrain"
    _run_steps(DvcLiveSink(folder), 0, 7)
    assert not list(folder.glob(".*.tmp"))  # the atomic write leaves no temporary behind
    (folder / "metrics.json").write_text("")  # what the kill left
    _run_steps(DvcLiveSink(folder), 4, 10)
    assert json.loads((folder / "metrics.json").read_text()) == {"loss_total": 1.0, "lr": 0.1, "step": 9}
    assert list(pd.read_csv(folder / "plots" / "metrics" / "loss_total.tsv", sep="\t")["step"]) == list(range(10))


def test_dvclive_writes_its_files_in_a_git_checkout_with_no_commit_and_leaves_it_alone(tmp_path, monkeypatch):
    """A user's fresh `git init` (no commit, no DVC): DVCLive's own repository hooks ran `dvc init` there, then
    failed the training stage with "SCMError: Empty git repo"."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=project_env())
    monkeypatch.chdir(tmp_path)
    folder = Path("reports") / "dvclive" / "pretrain"
    _run_steps(DvcLiveSink(folder), 0, 3)
    track_results(TrackingParams(tensorboard_dir=None), "reports", "eval", [{"backbone": "t", "knn": 0.5}], [])
    assert json.loads((folder / "metrics.json").read_text())["step"] == 2
    assert json.loads(Path("reports/dvclive/eval/metrics.json").read_text()) == {"t": {"knn": 0.5}}
    assert not (tmp_path / ".dvc").exists()


def test_tensorboard_only_when_asked_and_resume_purges(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [type(s) for s in stage_sinks(TrackingParams(tensorboard_dir=None), str(tmp_path), "pretrain")] \
        == [DvcLiveSink]
    sinks = stage_sinks(TrackingParams(tensorboard_dir=str(tmp_path / "tb")), str(tmp_path), "pretrain")
    assert [type(s) for s in sinks] == [DvcLiveSink, TensorBoardSink]
    board = tmp_path / "tb" / "pretrain"
    _run_steps(TensorBoardSink(board), 0, 7)
    _run_steps(TensorBoardSink(board), 4, 10)
    events = EventAccumulator(str(board))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss_total")]
    assert steps == list(range(10)), steps


def test_results_table_goes_to_dvclive_and_figures_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    figure = tmp_path / "pca_teacher.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(figure)
    rows = [{"backbone": "teacher", "kind": "trained", "knn_top1_k20": 0.61, "seg_miou": None},
            {"backbone": "raw-pixels", "kind": "baseline", "knn_top1_k20": 0.55, "seg_miou": None}]
    board = tmp_path / "tb"
    track_results(TrackingParams(tensorboard_dir=str(board)), str(tmp_path / "reports"), "eval", rows, [figure])
    live = tmp_path / "reports" / "dvclive" / "eval"
    assert json.loads((live / "metrics.json").read_text()) == {"teacher": {"knn_top1_k20": 0.61},
                                                                "raw-pixels": {"knn_top1_k20": 0.55}}
    events = EventAccumulator(str(board / "eval"))
    events.Reload()
    assert events.Tags()["images"] == ["pca_teacher"]
    assert [e.value for e in events.Scalars("teacher/knn_top1_k20")] == [pytest.approx(0.61)]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=project_env(), capture_output=True, text=True,
                          check=True).stdout


def _toy_project(root: Path) -> Path:
    """A git + DVC project with one stage whose metric is twice its param."""
    root.mkdir()
    (root / "step.py").write_text(
        "import json, os, yaml\n"
        "x = yaml.safe_load(open('params.yaml'))['a']['x']\n"
        "os.makedirs('out', exist_ok=True); open('out/o.txt', 'w').write(str(x))\n"
        "os.makedirs('rep', exist_ok=True); json.dump({'v': 2 * x}, open('rep/m.json', 'w'))\n"
        "open('rep/curve.csv', 'w').write('step,loss\\n' + ''.join(f'{i},{x / (i + 1)}\\n' for i in range(3)))\n")
    (root / "params.yaml").write_text("a:\n  x: 1\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {
        "cmd": f"{sys.executable} step.py", "deps": ["step.py"], "params": ["a"], "outs": ["out"],
        "metrics": [{"rep/m.json": {"cache": False}}],
        "plots": [{"rep/curve.csv": {"cache": False, "x": "step", "y": "loss"}}]}}}))
    (root / ".gitignore").write_text("/rep/\n/out\n")
    _git(root, "init", "-q")
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=root, check=True, env=project_env())
    return root


def _exp_show(root: Path) -> dict[str, dict]:
    """experiment name -> {params, metrics} from `dvc exp show --json`."""
    out = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=root, env=project_env(),
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for baseline in json.loads(out):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                found[rev.get("name")] = {"params": data["params"]["params.yaml"]["data"],
                                          "metrics": data["metrics"]["rep/m.json"]["data"]}
    return found


def test_a_run_is_saved_as_an_experiment_with_the_params_it_used(tmp_path):
    """A run with the project's params and one in a view with other params (a profile/override run): both are
    listed by `dvc exp show` with their own params and metrics, `dvc plots diff` draws both curves; the project's
    tracked files never change."""
    root = _toy_project(tmp_path / "p")
    with pytest.raises(NoExperiment, match="no commit"):
        save_experiment(root, "early", ["s"])
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")
    env = project_env()
    subprocess.run([str(BIN / "dvc"), "repro", "-q"], cwd=root, env=env, check=True)
    save_experiment(root, "plain-run", ["s"])

    # what a view run leaves: the project's outputs and lock from x=3, the project's params.yaml untouched
    view_params = "a:\n  x: 3\n"
    (root / "params.yaml").write_text(view_params)
    subprocess.run([str(BIN / "dvc"), "repro", "-q"], cwd=root, env=env, check=True)
    (root / "params.yaml").write_text("a:\n  x: 1\n")
    before = (_git(root, "status", "--porcelain"), (root / "dvc.lock").read_text())
    save_experiment(root, "view-run", ["s"], view_params)
    assert (_git(root, "status", "--porcelain"), (root / "dvc.lock").read_text()) == before
    assert (root / "params.yaml").read_text() == "a:\n  x: 1\n"

    shown = _exp_show(root)
    assert shown["plain-run"] == {"params": {"a": {"x": 1}}, "metrics": {"v": 2}}
    assert shown["view-run"] == {"params": {"a": {"x": 3}}, "metrics": {"v": 6}}
    # `dvc plots diff` draws both runs' curves from their experiment commits
    diff = subprocess.run([str(BIN / "dvc"), "plots", "diff", "plain-run", "view-run", "--json"],
                          cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    values = json.loads(diff)["data"]["rep/curve.csv"][0]["content"]["data"]["values"]
    curves = {(v["rev"], round(float(v["loss"]), 4)) for v in values}
    assert curves == {("plain-run", 1.0), ("plain-run", 0.5), ("plain-run", 0.3333),
                      ("view-run", 3.0), ("view-run", 1.5), ("view-run", 1.0)}
    assert not (root / ".dvc" / "tmp" / "exp-worktree").exists()
    assert "exp-worktree" not in _git(root, "worktree", "list")
