"""The pipeline from Python, with the reach of the CLI: your images in, an evaluated backbone out.

    from flows.api import train
    weights = train("my_images/", labels="my_labelled/", project=".")

`train` is `dinov2-pipeline init` followed by `dinov2-pipeline run --profile params.<name>.yaml`: the same Prefect
flow, DVC stages, checks and reports, so a Python run and a CLI run are the same run.
"""

from __future__ import annotations

from pathlib import Path

from flows.pipeline import dinov2_pipeline
from tasks.params import load_params
from tasks.user_data import init_project


def train(data: str, labels: str | Path | None = None, *, name: str | None = None, project: str | Path = ".",
          overrides: list[str] | None = None, stages: list[str] | None = None, push: bool = False,
          test_fraction: float = 0.2) -> Path:
    """Curate `data`, pre-train, adapt, distil and evaluate (with `labels`, a class_name/*.jpg folder: k-NN and
    linear; without: the label-free report); return the exported backbone the eval stage lists last (the distilled
    student by default). `overrides` are `section.key=value` params overrides, as `--set`; `stages` a subset."""
    project = Path(project).resolve()
    result = init_project(data, labels, name, project, test_fraction)
    dinov2_pipeline(stages=stages, profile=result.profile.name, overrides=list(overrides or []),
                    project_dir=str(project), push=push)
    params = load_params(result.profile, list(overrides or []))
    weights = Path(params.eval.backbones[-1].weights)
    return weights if weights.is_absolute() else project / weights
