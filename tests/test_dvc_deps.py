"""`dvc repro` is only as reproducible as each stage's deps are complete: every project module a stage's code imports
(transitively, function-local imports and `-m module` launches included) must be a DVC dependency of that stage,
or editing it would leave `dvc status` at "up to date" over stale outputs."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest
import yaml

from tasks.params import Params
from tasks.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "dinov2_core")
# Modules that cannot change what a stage writes: log formatting only.
CANNOT_CHANGE_OUTPUTS = {"tasks/log.py"}


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_inits(path: Path) -> set[Path]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    inits, folder = set(), path.parent
    while folder != ROOT and (folder / "__init__.py").is_file():
        inits.add(folder / "__init__.py")
        folder = folder.parent
    return inits


@cache
def _direct_imports(path: Path) -> frozenset[Path]:
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    else:
        package = package.removesuffix(".__init__")
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # `python -m tasks.train_worker`, importlib.import_module("...")
    found = set()
    for name in names:
        file = _module_file(name)
        if file is not None:
            found.add(file)
            found |= _package_inits(file)
    return frozenset(found)


def imported_files(module: str) -> set[str]:
    start = _module_file(module)
    assert start is not None, module
    seen, todo = set(), [start, *_package_inits(start)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(_direct_imports(path) - seen)
    return {p.relative_to(ROOT).as_posix() for p in seen}


def _covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_dvc_stage_is_a_registered_stage():
    assert list(_dvc_stages()) == list(STAGES)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_code_is_covered_by_its_dvc_deps(stage):
    spec = _dvc_stages()[stage]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
    module = STAGES[stage].target.split(":")[0]
    missing = sorted(f for f in imported_files(module) - CANNOT_CHANGE_OUTPUTS if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage '{stage}' imports these without depending on them: {missing}"


def test_the_scanner_sees_function_local_and_launched_modules():
    files = imported_files("tasks.pretrain")
    assert "tasks/train_worker.py" in files  # launched by torchrun as `-m tasks.train_worker`
    assert "dinov2_core/train/ssl_meta_arch.py" in files  # imported inside a function
    assert "tasks/eval.py" not in files and "tasks/adapt.py" not in files  # not over-approximated


# Params sections that say where reports go or name the profile: they cannot change a stage's outputs.
NOT_OUTPUT_PARAMS = {"reports", "profile"}


def params_read(files: set[str]) -> set[tuple[str, ...]]:
    """(section,) or (section, key) for every `params.section[.key]` read in the stage layer's code."""
    found = set()
    for file in files:
        if not file.startswith("tasks/"):
            continue
        for node in ast.walk(ast.parse((ROOT / file).read_text())):
            chain = []
            while isinstance(node, ast.Attribute):
                chain.append(node.attr)
                node = node.value
            key = tuple(reversed(chain))[:2]
            if isinstance(node, ast.Name) and node.id == "params" and chain and key[0] in Params.model_fields:
                found.add(key)
    return found


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_a_stage_reads_are_dvc_params_of_it(stage):
    declared = [p if isinstance(p, str) else next(iter(p)) for p in _dvc_stages()[stage].get("params", [])]
    module = STAGES[stage].target.split(":")[0]
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
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    Repo.init(str(tmp_path), no_scm=True)
    repo = Repo(str(tmp_path))
    stages = {s.name: s for s in repo.index.stages}
    assert [o.def_path for o in stages["ingest"].outs] == ["elsewhere/ingest", "elsewhere/reports/metrics/ingest.json"]
    assert "elsewhere/ingest" in [d.def_path for d in stages["dedup"].deps]
    assert ("dedup", "ingest") in {(a.name, b.name) for a, b in repo.index.graph.edges()}
