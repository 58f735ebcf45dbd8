"""Every flow run as a DVC experiment, so `dvc exp show` lists runs (params, metrics, DVCLive numbers) and
`dvc plots diff <exp> <exp>` compares their curves and figures.

`dvc exp save` commits what is in a workspace: its `params.yaml`, `dvc.lock`, the tracked code, and the metrics
and plots named with `--include-untracked`. A run with a profile or overrides ran in a view whose params.yaml is
not the project's (flows/pipeline.py), and the project's tracked files must stay untouched, so the experiment is
saved from a throwaway git worktree of the project instead: HEAD plus the project's uncommitted tracked changes, the
run's params.yaml and dvc.lock, copies of the entries holding the metrics and plots, links to the other outputs,
and the project's DVC cache. Git keeps one set of refs for all worktrees, so the experiment appears in the project.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

from dvc.config import Config
from dvc.repo import Repo

_WORKTREE = ".dvc/tmp/exp-worktree"  # inside .dvc/tmp: ignored by the project's git and DVC


class NoExperiment(RuntimeError):
    """Why this run is not saved as a DVC experiment (no git, no commit yet); the run itself is fine."""


def _git(project: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NoExperiment(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"git {args[0]} failed")
    return proc.stdout


@contextlib.contextmanager
def _quiet_dvc():
    """DVC warns that the untracked files it was not asked to include stay out of the commit: all of them, here."""
    dvc_log = logging.getLogger("dvc")
    level = dvc_log.level
    dvc_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        dvc_log.setLevel(level)


def _remove_worktree(project: Path, where: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=project, capture_output=True,
                   check=False)
    shutil.rmtree(where, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=project, capture_output=True, check=False)


def stage_outputs(repo_root: Path, params_text: str | None = None) -> tuple[list[str], list[str]]:
    """(every output of the stages, the uncached metrics and plots among them that exist: what `dvc exp show` /
    `dvc plots diff` read from an experiment's commit), as relative paths. With `params_text`, the stages DVC
    resolves from those params (a run with other params may have more: the curation loop's later rounds)."""
    if params_text is None:
        return _outputs(repo_root, repo_root)
    with tempfile.TemporaryDirectory() as tmp:  # dvc.yaml resolved against the run's params, nothing else
        shutil.copy(repo_root / "dvc.yaml", Path(tmp) / "dvc.yaml")
        (Path(tmp) / "params.yaml").write_text(params_text)
        with _quiet_dvc():  # "Initialized DVC repository." of a throwaway repo in the middle of the run's output
            Repo.init(tmp, no_scm=True)
        return _outputs(Path(tmp), repo_root)


def _outputs(dvc_root: Path, workspace: Path) -> tuple[list[str], list[str]]:
    with Repo(str(dvc_root)) as repo:
        outs = [(str(Path(out.fs_path).relative_to(repo.root_dir)), not out.use_cache and (out.metric or out.plot))
                for stage in repo.index.stages for out in stage.outs]
    return sorted({p for p, _ in outs}), sorted({p for p, result in outs if result and (workspace / p).exists()})


def save_experiment(project: Path, name: str, stages: list[str], params_text: str | None = None) -> str:
    """Save the results of `stages` as DVC experiment `name` (replacing one of that name); `params_text`: the
    params.yaml the run used when it is not the project's. Returns the experiment's git ref. Raises NoExperiment
    when the project cannot hold experiments (not a git repo, no commit)."""
    if not (project / ".git").exists():
        raise NoExperiment("the project is not a git repository (`git init` and a first commit)")
    try:
        _git(project, "rev-parse", "--verify", "HEAD")
    except NoExperiment:
        raise NoExperiment("the project's git repository has no commit yet") from None
    outputs, results = stage_outputs(project, params_text)
    where = project / _WORKTREE
    _remove_worktree(project, where)  # a killed run's
    _git(project, "worktree", "add", "--detach", "--force", str(where), "HEAD")
    try:
        _mirror(project, where, outputs, results)
        if params_text is not None:
            (where / "params.yaml").write_text(params_text)
        with contextlib.chdir(where), Repo(str(where)) as repo, _quiet_dvc():  # targets resolve from the cwd
            repo.experiments.save(targets=stages, name=name, include_untracked=results, force=True)
        ref = next((line.split()[-1] for line in _git(project, "for-each-ref", "--format=%(refname)",
                                                      "refs/exps").splitlines() if line.endswith(f"/{name}")), None)
        if ref is None:
            raise NoExperiment(f"dvc exp save reported no experiment named {name}")
        return ref
    finally:
        _remove_worktree(project, where)


def _mirror(project: Path, where: Path, outputs: list[str], results: list[str]) -> None:
    """Make the worktree hold what the project's workspace holds, as far as an experiment commit sees it."""
    changed = _git(project, "diff", "--name-only", "--no-renames", "HEAD").splitlines()
    for rel in changed:  # uncommitted changes to tracked files (code being tried): the experiment records them
        source, target = project / rel, where / rel
        if source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        else:
            target.unlink(missing_ok=True)
    results_set = set(results)
    for out in outputs:  # links to the outputs (DVC hashes them; git never sees through a link), copies of results
        source, target = project / out, where / out
        if target.exists() or target.is_symlink() or not (source.exists() or source.is_symlink()):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)  # real folders: DVC writes their .gitignore
        if out in results_set and source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        elif out in results_set:
            shutil.copy2(source, target)
        else:
            target.symlink_to(source.resolve())
    for entry in project.iterdir():  # anything else git does not track at the top level
        if entry.name in {".git", ".dvc"} or (where / entry.name).exists():
            continue
        if entry.name == "dvc.lock":  # committed with the experiment, and often untracked
            shutil.copy2(entry, where / entry.name)
        else:
            (where / entry.name).symlink_to(entry)
    for rel in _git(project, "ls-files", "--others", "--exclude-standard").splitlines():  # new code not yet added
        source, target = project / rel, where / rel
        if not target.exists() and not (where / Path(rel).parts[0]).is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    # the project's cache (its outputs are there already) and remotes, relative paths rewritten by DVC
    source, target = Config(dvc_dir=str(project / ".dvc"), validate=False), \
        Config(dvc_dir=str(where / ".dvc"), validate=False)
    cache_dir = Repo(str(project), uninitialized=True).cache.local_cache_dir
    local = source.load_one("local")
    with target.edit("local", validate=False) as edit:
        edit.update(local)
        edit.setdefault("cache", {})["dir"] = cache_dir
