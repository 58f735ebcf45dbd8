"""`dvc.yaml`, rendered from the stage registry (`tasks.stages.STAGES`), so the stage list is written once.

`dvc repro` is only as reproducible as each stage's deps are complete. A stage's code deps are every project module
its module imports, transitively (function-local imports and `-m module` / `importlib` strings included), and its
params are every `params.<section>` that code reads: both are derived here from the source, never listed by hand,
so editing a helper makes exactly the stages that run it stale. Run `dinov2-pipeline dvc-yaml` after adding a stage
or an import; a test fails while the checked-in file differs from the rendering."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from tasks.loop import FOREACH_SUFFIX, ROUND_DROPPED_DEPS, ROUND_EXTRA_DEPS, ROUND_STAGES, round_dvc_path
from tasks.params import Params
from tasks.stages import STAGES, DvcPath, Stage

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = ROOT / "dvc.yaml"
PACKAGES = ("tasks", "dinov2_core")
# Modules that cannot change what a stage writes (log formatting), and params that only say where reports go.
CANNOT_CHANGE_OUTPUTS = frozenset({"tasks/log.py"})
NOT_OUTPUT_PARAMS = frozenset({"reports", "profile"})

_HEADER = """\
# Rendered from tasks/stages.py by `dinov2-pipeline dvc-yaml`: edit the registry, not this file (a test compares).
# Each stage's cmd goes through the one CLI entry point; params are read from params.yaml, and every data path here
# is interpolated from it (${...}), so a profile or override that moves an input or output moves it for DVC too.
# Code deps and params sections are what the stage's module imports and reads (tasks/dvc_yaml.py).
"""


def module_file(name: str, root: Path = ROOT) -> Path | None:
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_inits(path: Path, root: Path) -> set[Path]:
    """Importing a.b.c runs a/__init__.py and a/b/__init__.py first."""
    inits, folder = set(), path.parent
    while folder != root and (folder / "__init__.py").is_file():
        inits.add(folder / "__init__.py")
        folder = folder.parent
    return inits


@cache
def _direct_imports(path: Path, root: Path) -> frozenset[Path]:
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(root).with_suffix("").parts)
    package = package.removesuffix(".__init__") if path.name == "__init__.py" else package.rsplit(".", 1)[0]
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
        file = module_file(name, root)
        if file is not None:
            found.add(file)
            found |= _package_inits(file, root)
    return frozenset(found)


def imported_files(module: str, root: Path = ROOT) -> set[str]:
    """Repo-relative files of `module` and every project module it imports, transitively."""
    start = module_file(module, root)
    if start is None:
        raise ValueError(f"no project module '{module}' under {root}")
    seen, todo = set(), [start, *_package_inits(start, root)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(_direct_imports(path, root) - seen)
    return {p.relative_to(root).as_posix() for p in seen}


def params_read(files: set[str], root: Path = ROOT) -> set[tuple[str, ...]]:
    """(section,) or (section, key) for every `params.section[.key]` read in the stage layer's code."""
    found = set()
    for file in files:
        if not file.startswith("tasks/"):
            continue
        for node in ast.walk(ast.parse((root / file).read_text())):
            chain = []
            while isinstance(node, ast.Attribute):
                chain.append(node.attr)
                node = node.value
            key = tuple(reversed(chain))[:2]
            if isinstance(node, ast.Name) and node.id == "params" and chain and key[0] in Params.model_fields:
                found.add(key)
    return found


def code_deps(stage: Stage, root: Path = ROOT) -> list[str]:
    """The stage's code files; a sub-package (`dinov2_core/curation`) is named as a folder when the stage imports
    all of it."""
    files = imported_files(stage.module, root) - CANNOT_CHANGE_OUTPUTS
    deps = set(files)
    for package in {Path(*Path(f).parts[:2]) for f in files if len(Path(f).parts) > 2}:
        members = {p.relative_to(root).as_posix() for p in (root / package).rglob("*.py")}
        if members <= files:
            deps = (deps - members) | {package.as_posix()}
    return sorted(deps)


def stage_params(stage: Stage, root: Path = ROOT) -> list[str]:
    return sorted({key[0] for key in params_read(imported_files(stage.module, root), root)} - NOT_OUTPUT_PARAMS)


def _entry(item: DvcPath | str, options: dict | None = None, note: str = "") -> list[str]:
    if isinstance(item, DvcPath):
        path, note, options = item.path, item.note, (options or {}) | item.options
    else:
        path = item
    comment = f"   # {note}" if note else ""
    if not options:
        return [f"      - {path}{comment}"]
    lines = [f"      - {path}:{comment}"]
    for key, value in options.items():
        lines.append(f"          {key}: {str(value).lower() if isinstance(value, bool) else value}")
    return lines


def render_stage(stage: Stage, root: Path = ROOT) -> list[str]:
    lines = [f"  {stage.name}:", f"    cmd: dinov2-pipeline stage {stage.name}"]
    deps = [*(lines_ for d in stage.deps for lines_ in _entry(d)),
            *(f"      - {f}" for f in code_deps(stage, root))]
    lines += ["    deps:", *deps]
    lines += ["    params:", *(f"      - {p}" for p in stage_params(stage, root))]
    if stage.outs:
        lines += ["    outs:", *(line for o in stage.outs for line in _entry(o))]
    lines += ["    metrics:", *(line for m in stage.metrics for line in _entry(m, {"cache": False}))]
    if stage.plots:
        lines += ["    plots:", *(line for p in stage.plots for line in _entry(p))]
    return lines


def _round_entry(item: DvcPath | str) -> DvcPath:
    item = item if isinstance(item, DvcPath) else DvcPath(item)
    return DvcPath(round_dvc_path(item.path), item.note, item.options)


def render_round_stage(stage: Stage, root: Path = ROOT) -> list[str]:
    """The stage once per later curation-loop round (tasks/loop.py): a DVC foreach over `loop.rounds`, each
    iteration's paths moved into its round's folder; no stage at all while `loop.rounds` is empty."""
    deps = [_round_entry(d) for d in stage.deps if not any(x in str(d.path) for x in ROUND_DROPPED_DEPS)]
    deps += [DvcPath(d) for d in ROUND_EXTRA_DEPS.get(stage.name, ())]
    code = sorted(set(code_deps(stage, root)) | {"tasks/loop.py"})
    outs = [_round_entry(o) for o in stage.outs]
    metrics = [_round_entry(m) for m in stage.metrics]
    if stage.name == ROUND_STAGES[-1]:  # the round's table against the earlier rounds
        outs.append(DvcPath("${reports}/${key}/loop.md", "this round next to the earlier ones", {"cache": False}))
        metrics.append(DvcPath("${reports}/${key}/metrics/loop.json"))
    lines = [f"  {stage.name}{FOREACH_SUFFIX}:", "    foreach: ${loop.rounds}   # round name: the export curating it",
             "    do:", f"      cmd: dinov2-pipeline stage {stage.name} --round ${{key}}"]
    lines += ["      deps:", *(f"  {x}" for d in deps for x in _entry(d)), *(f"        - {f}" for f in code)]
    lines += ["      params:", *(f"        - {p}" for p in [*stage_params(stage, root), "loop.out"])]
    lines += ["      outs:", *(f"  {x}" for o in outs for x in _entry(o))]
    lines += ["      metrics:", *(f"  {x}" for m in metrics for x in _entry(m, {"cache": False}))]
    if stage.plots:
        lines += ["      plots:", *(f"  {x}" for p in stage.plots for x in _entry(_round_entry(p)))]
    return lines


def render_dvc_yaml(stages: dict[str, Stage] | None = None, root: Path = ROOT) -> str:
    stages = stages or STAGES
    body = ["stages:"]
    for i, stage in enumerate(stages.values()):
        body += ([""] if i else []) + render_stage(stage, root)
    for name in ROUND_STAGES:
        if name in stages:
            body += ["", *render_round_stage(stages[name], root)]
    return _HEADER + "\n".join(body) + "\n"
