"""The curation loop from one command: round 1 as always, round 2 curated with round 1's exported teacher, trained
and evaluated again as a Prefect sub-flow, both rounds in one table; afterwards DVC holds every round's stages
up to date (`dvc repro` of the finished loop does nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.loop import ROUND_STAGES, dvc_stage, round_overrides, rounds_setting
from tasks.params import load_params

from .conftest import make_project, project_env
from .test_user_data import _tiny_run

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]


def test_round_overrides_move_every_output_and_curate_with_the_previous_export():
    base = load_params(ROOT / "params.yaml", [rounds_setting(3, "data/pretrain", "data")])
    assert base.loop.rounds == {"round-2": "data/pretrain/export", "round-3": "data/round-2/pretrain/export"}
    r3 = load_params(ROOT / "params.yaml", [rounds_setting(3, "data/pretrain", "data"),
                                              *round_overrides(base, "round-3")])
    assert r3.retrieve.embedder.kind == "dinov2"
    assert r3.retrieve.embedder.weights == "data/round-2/pretrain/export/teacher_backbone.pth"
    assert (r3.retrieve.out, r3.shards.out, r3.pretrain.out, r3.eval.out, r3.reports) == (
        "data/round-3/retrieve", "data/round-3/shards", "data/round-3/pretrain", "data/round-3/eval",
        "reports/round-3")
    assert r3.pretrain.data.shards == "data/round-3/shards/shards.json"
    assert [b.name for b in r3.eval.backbones] == ["round-3-teacher"]
    assert (r3.decontaminate.out, r3.dedup.out) == (base.decontaminate.out, base.dedup.out)  # not redone
    with pytest.raises(ValueError, match="round-4"):
        round_overrides(base, "round-4")
    with pytest.raises(Exception, match="round-2, round-3"):
        load_params(ROOT / "params.yaml", ["loop.rounds={round-3: data/pretrain/export}"])


def _run(cmd, cwd):
    return subprocess.run(cmd, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=1200, check=False)


@pytest.mark.slow
def test_two_rounds_from_one_command_then_dvc_repro_is_a_no_op(tmp_path):
    project = make_project(tmp_path / "proj", [])
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "project"], project)
    sets = [f"-S{o}" for o in _tiny_run()]
    res = _run([str(BIN / "dinov2-pipeline"), "run", "--rounds", "2", *sets], project)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in ROUND_STAGES:
        assert f"| {dvc_stage(stage, 'round-2')} | yes |" in res.stdout, res.stdout[-3000:]
    retrieve2 = json.loads((project / "reports" / "round-2" / "metrics" / "retrieve.json").read_text())
    assert retrieve2["params"]["embedder"]["kind"] == "dinov2" and retrieve2["curated"] > 0
    assert retrieve2["embedder"]["weights"] == "data/pretrain/export/teacher_backbone.pth"
    rows = json.loads((project / "reports" / "round-2" / "metrics" / "loop.json").read_text())["rounds"]
    by_round = {r["round"]: r for r in rows}
    assert {"round-1", "round-2", "raw-pixels"} <= set(by_round) and len(rows) == 4  # + random init
    assert by_round["round-1"]["curated_with"] == "copy-detection" and by_round["round-2"]["curated_with"] == "dinov2"
    for name in ("round-1", "round-2"):
        assert 0.0 <= by_round[name]["curated_in_domain_share"] <= 1.0 and 0.0 <= by_round[name]["knn_top1"] <= 1.0
    assert (project / "data" / "round-2" / "pretrain" / "export" / "teacher_backbone.pth").is_file()
    assert "| round-2 | dinov2 |" in (project / "reports" / "round-2" / "loop.md").read_text()
    # the run is one DVC experiment holding both rounds: `dvc exp show` lists round 2's table with the loop params
    shown = json.loads(_run([str(BIN / "dvc"), "exp", "show", "--json"], project).stdout)
    exps = [rev for b in shown for e in b.get("experiments") or [] for rev in e.get("revs") or []]
    assert len(exps) == 1, shown
    data = exps[0]["data"]
    assert data["metrics"]["reports/round-2/metrics/retrieve.json"]["data"]["curated"] == retrieve2["curated"]
    assert "reports/round-2/metrics/loop.json" in data["metrics"] and "reports/metrics/eval.json" in data["metrics"]
    assert data["params"]["params.yaml"]["data"]["loop"]["rounds"] == {"round-2": "data/pretrain/export"}

    # The finished loop, as a project whose params.yaml states it: DVC finds nothing to redo, round 2 included.
    tree = yaml.safe_load((project / "params.yaml").read_text())
    for item in _tiny_run():
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    tree["loop"]["rounds"] = {"round-2": "data/pretrain/export"}
    (project / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    status = _run([str(BIN / "dvc"), "status", "--json"], project)
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout[-3000:]
    repro = _run([str(BIN / "dvc"), "repro"], project)
    assert repro.returncode == 0 and "up to date" in repro.stdout, repro.stdout[-2000:]
    assert "Running stage" not in repro.stdout, repro.stdout[-2000:]
