"""`dvc repro` is only as reproducible as each stage's deps are complete: every project module a stage's code imports
(transitively, function-local imports and `-m module` launches included) must be a DVC dependency of that stage,
or editing it would leave `dvc status` at "up to date" over stale outputs."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from dinov2_core.config import PosInt
from tasks.dvc_yaml import (
    CANNOT_CHANGE_OUTPUTS,
    NOT_OUTPUT_PARAMS,
    imported_files,
    params_read,
    render_dvc_yaml,
)
from tasks.loop import FOREACH_SUFFIX, ROUND_STAGES, dvc_stage
from tasks.params import compose_params, read_params_tree
from tasks.sections import Section
from tasks.stages import STAGES, DvcPath, Stage

ROOT = Path(__file__).resolve().parents[1]


def _covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_dvc_stage_is_a_registered_stage():
    """The registry's stages, then the curation loop's per-round stages (foreach over loop.rounds)."""
    assert list(_dvc_stages()) == [*STAGES, *(f"{s}{FOREACH_SUFFIX}" for s in ROUND_STAGES)]


def test_dvc_runs_a_later_round_after_round_one(tmp_path):
    """Real DVC with `loop.rounds: {round-2: data/pretrain/export}`: one stage per round stage, its outputs and
    reports in the round's folders, and the DAG round 1 pretrain -> round 2 retrieve -> shards -> pretrain -> eval
    (which also waits for round 1's eval: the round table). With no rounds, no round stage."""
    from dvc.repo import Repo

    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert tree["loop"]["rounds"] == {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    Repo.init(str(tmp_path), no_scm=True)
    assert {s.name for s in Repo(str(tmp_path)).index.stages} == set(STAGES)
    tree["loop"]["rounds"] = {"round-2": "data/pretrain/export"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    repo = Repo(str(tmp_path))
    stages = {s.name: s for s in repo.index.stages}
    assert set(stages) - set(STAGES) == {dvc_stage(s, "round-2") for s in ROUND_STAGES}
    retrieve = stages[dvc_stage("retrieve", "round-2")]
    assert retrieve.cmd == "dinov2-pipeline stage retrieve --round round-2"
    assert [o.def_path for o in retrieve.outs] == ["data/round-2/retrieve", "reports/round-2/metrics/retrieve.json"]
    eval_outs = [o.def_path for o in stages[dvc_stage("eval", "round-2")].outs]
    assert "reports/round-2/loop.md" in eval_outs and "data/round-2/eval" in eval_outs
    edges = {(a.name, b.name) for a, b in repo.index.graph.edges()}
    chain = ["pretrain", *(dvc_stage(s, "round-2") for s in ROUND_STAGES)]
    assert all((later, earlier) in edges for earlier, later in itertools.pairwise(chain))
    assert (dvc_stage("eval", "round-2"), "eval") in edges


@pytest.mark.parametrize("stage", ROUND_STAGES)
def test_round_stage_code_and_paths(stage):
    """A round stage depends on the same code as the stage plus the loop's, and every data path is interpolated."""
    body = _dvc_stages()[f"{stage}{FOREACH_SUFFIX}"]["do"]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in body.get("deps", [])]
    missing = sorted(f for f in imported_files(STAGES[stage].module) | {"tasks/loop.py"}
                     if f not in CANNOT_CHANGE_OUTPUTS and not _covered(f, deps))
    assert not missing, missing
    literal = [p for kind in ("deps", "outs", "metrics", "plots") for p in _paths(body, kind)
               if "${" not in p and not p.startswith(CODE_DEPS)]
    assert not literal, literal


def test_dvc_yaml_is_the_rendering_of_the_registry():
    """The stage list lives in tasks/stages.py; dvc.yaml is rendered from it and from each stage's imports, so a new
    import or stage that was not rendered is caught here, not by a stale `dvc repro`."""
    assert (ROOT / "dvc.yaml").read_text() == render_dvc_yaml(), "dvc.yaml is stale: run `dinov2-pipeline dvc-yaml`"


def test_adding_a_stage_is_one_registry_entry(tmp_path):
    """CONTRIBUTING's recipe: a module, its section + one `Stage(...)` in the registry, its values in params.yaml.
    `Params` composed from that registry validates the new section (typos and bad values refused, the section
    required); the rendering gives DVC a complete stage (cmd through the CLI, code deps from the module's imports,
    params it reads, metrics), which real DVC parses and links after its upstream stage."""
    from dvc.repo import Repo

    class ToyParams(Section):
        out: str
        size: PosInt

    toy = Stage("toy", "tasks.shards:run_shards", "a new stage", params=ToyParams, deps=("${ingest.out}",),
                outs=(DvcPath("${toy.out}", "what it writes"),))
    registry = {"ingest": STAGES["ingest"], "toy": toy}
    tree = read_params_tree(ROOT / "params.yaml") | {"toy": {"out": "out/toy", "size": 3}}
    params = compose_params({**STAGES, "toy": toy})
    assert params.model_validate(tree).toy.size == 3
    for bad in ({"out": "out/toy", "size": 0}, {"out": "out/toy", "size": 3, "sise": 3}, None):
        broken = {k: v for k, v in tree.items() if k != "toy"} | ({"toy": bad} if bad else {})
        with pytest.raises(ValidationError, match="toy"):
            params.model_validate(broken)

    (tmp_path / "dvc.yaml").write_text(render_dvc_yaml(registry))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    Repo.init(str(tmp_path), no_scm=True)
    stages = {s.name: s for s in Repo(str(tmp_path)).index.stages}
    assert stages["toy"].cmd == "dinov2-pipeline stage toy"
    deps = [d.def_path for d in stages["toy"].deps]
    assert "tasks/shards.py" in deps and "tasks/storage.py" in deps and "data/ingest" in deps
    assert [o.def_path for o in stages["toy"].outs] == ["out/toy", "reports/metrics/toy.json"]
    params_read_by_toy = {key for p in stages["toy"].params for key in p.params}
    assert {"shards", "storage"} <= params_read_by_toy


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_code_is_covered_by_its_dvc_deps(stage):
    spec = _dvc_stages()[stage]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
    module = STAGES[stage].module
    missing = sorted(f for f in imported_files(module) - CANNOT_CHANGE_OUTPUTS if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage '{stage}' imports these without depending on them: {missing}"


def test_the_scanner_sees_function_local_and_launched_modules():
    files = imported_files("tasks.pretrain")
    assert "tasks/train_worker.py" in files  # launched by torchrun as `-m tasks.train_worker`
    assert "dinov2_core/train/ssl_meta_arch.py" in files  # imported inside a function
    assert "tasks/eval.py" not in files and "tasks/adapt.py" not in files  # not over-approximated


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_a_stage_reads_are_dvc_params_of_it(stage):
    declared = [p if isinstance(p, str) else next(iter(p)) for p in _dvc_stages()[stage].get("params", [])]
    module = STAGES[stage].module
    missing = sorted(".".join(key) for key in params_read(imported_files(module))
                     if key[0] not in NOT_OUTPUT_PARAMS and not any(
                         d == key[0] or d == ".".join(key) for d in declared))
    assert not missing, f"dvc.yaml stage '{stage}' reads params it does not declare: {missing}"


def test_caches_outside_dvc_are_keyed_by_the_code_that_filled_them(tmp_path, monkeypatch):
    """Embedding and feature caches live outside DVC outputs; an edit of the code that computed them must miss."""
    from tasks import embeddings

    (tmp_path / "dinov2_core" / "curation").mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    descriptor = tmp_path / "dinov2_core" / "curation" / "embed.py"
    descriptor.write_text("SCALE = 1\n")
    for name in ("backbones.py", "embeddings.py"):
        (tmp_path / "tasks" / name).write_text("")
    monkeypatch.setattr(embeddings, "_REPO", tmp_path)
    embeddings.source_digest.cache_clear()
    before = embeddings.embedder_cache_id("copy-detection", {"dim": 64})
    assert embeddings.embedder_cache_id("copy-detection", {"dim": 64}) == before
    descriptor.write_text("SCALE = 2\n")
    embeddings.source_digest.cache_clear()
    assert embeddings.embedder_cache_id("copy-detection", {"dim": 64}) != before
    embeddings.source_digest.cache_clear()


CODE_DEPS = ("tasks/", "dinov2_core/")
# Outputs DVC cannot follow to where params put them: shards.out may be an s3:// prefix (not a DVC output).
LITERAL_PATHS = {("shards", "data/shards")}


def _paths(body: dict, kind: str) -> list[str]:
    return [p for item in body.get(kind) or [] for p in ([item] if isinstance(item, str) else item)]


@pytest.mark.parametrize("stage", list(STAGES))
def test_data_paths_in_dvc_yaml_come_from_params(stage):
    """A profile or override that moves an input or output must move it for DVC too, so every data path of a stage
    is interpolated from params.yaml (`${section.key}`), never restated literally."""
    body = _dvc_stages()[stage]
    literal = [p for kind in ("deps", "outs", "metrics", "plots") for p in _paths(body, kind)
               if "${" not in p and not p.startswith(CODE_DEPS) and (stage, p) not in LITERAL_PATHS]
    assert not literal, f"{stage}: literal data paths in dvc.yaml: {literal}"


def test_dvc_resolves_moved_outputs_from_params(tmp_path):
    """Real DVC, with params.yaml moving ingest's output (and dedup's input) and the reports folder: the resolved
    stages write and read the new paths and the DAG still links ingest -> dedup."""
    from dvc.repo import Repo

    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    tree = yaml.safe_load((ROOT / "params.yaml").read_text())
    tree["ingest"]["out"] = tree["dedup"]["images"] = "elsewhere/ingest"
    tree["reports"] = "elsewhere/reports"
    tree["eval"]["backbones"] = tree["eval"]["backbones"][:1]  # any number of eval backbones parses
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    Repo.init(str(tmp_path), no_scm=True)
    repo = Repo(str(tmp_path))
    stages = {s.name: s for s in repo.index.stages}
    assert [o.def_path for o in stages["ingest"].outs] == ["elsewhere/ingest", "elsewhere/reports/metrics/ingest.json"]
    assert "elsewhere/ingest" in [d.def_path for d in stages["dedup"].deps]
    edges = {(a.name, b.name) for a, b in repo.index.graph.edges()}
    assert ("dedup", "ingest") in edges and ("eval", "distill") in edges
