"""`dinov2-pipeline`: the project's one command-line entry point.

`stage NAME` runs one stage's plain function (what DVC stage `cmd`s call), `run` runs the Prefect flow that
chains the DVC stages, `params` validates a params/profile file. Errors users can act on are printed as one
line (set DINOV2_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tasks.stages import PLANNED, STAGES

_STAGE_LIST = "\n".join(f"  {name:<14} {stage.summary}" for name, stage in STAGES.items())
_HELP = (
    "Meta's DINOv2 recipe as a pipeline: raw crawl -> curated data -> self-supervised ViT -> evaluation.\n\n"
    f"Stages (in DAG order):\n\n\b\n{_STAGE_LIST}\n\n"
    f"Planned: {', '.join(PLANNED)}"
)

app = typer.Typer(help=_HELP, no_args_is_help=True, add_completion=False, rich_markup_mode=None)

SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-S", help="Override a param, e.g. --set ingest.workers=4 (repeatable)."),
]
ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file to read.")]


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _guarded(fn, *args, **kwargs):
    """Run `fn`; known, user-actionable failures become one line on stderr and a non-zero exit."""
    from tasks.params import ParamsError
    from tasks.quality import DataQualityError
    from tasks.storage import StorageError

    if os.environ.get("DINOV2_DEBUG"):
        return fn(*args, **kwargs)
    try:
        return fn(*args, **kwargs)
    except ParamsError as exc:
        _fail(str(exc), 2)
    except DataQualityError as exc:
        _fail(str(exc), 3)
    except (StorageError, FileNotFoundError, ValueError, RuntimeError) as exc:
        name = type(exc).__name__
        _fail(f"{name}: {str(exc).splitlines()[0] if str(exc) else name}")


@app.command("stage")
def stage_cmd(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGES)}")],
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one stage outside DVC (e.g. on your own data with --set ingest.manifest=crawl.csv)."""
    from tasks.params import load_params

    if name not in STAGES:
        hint = " (not implemented yet)" if name in PLANNED else ""
        _fail(f"unknown stage '{name}'{hint}; stages: {', '.join(STAGES)}", 2)
    params = _guarded(load_params, params_file, set_ or [])
    _guarded(STAGES[name].load(), params)


@app.command("params")
def params_cmd(
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Validate a params/profile file and print the resolved values."""
    import yaml

    from tasks.params import load_params

    params = _guarded(load_params, params_file, set_ or [])
    typer.echo(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))


@app.command("run")
def run_cmd(
    stages: Annotated[Optional[list[str]], typer.Option("--stage", help="Run only these stages (repeatable).")] = None,
    project: Annotated[Path, typer.Option(help="Project folder holding dvc.yaml.")] = Path("."),
    force: Annotated[bool, typer.Option(help="Rerun stages even if DVC says they are up to date.")] = False,
) -> None:
    """Run the pipeline as a Prefect flow (one task per DVC stage; ephemeral Prefect when no server is set)."""
    from flows.pipeline import StageFailed, TransientStageError, dinov2_pipeline

    try:
        result = dinov2_pipeline(stages=stages, project_dir=str(project), force=force)
    except (StageFailed, TransientStageError) as exc:
        _fail(str(exc))
    typer.echo(result["summary"])


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
