"""The stage list, stated once: name -> the plain function that runs it, and the data it reads and writes.

The CLI, the Prefect flow and `dvc.yaml` all come from this list; `dvc.yaml` is rendered from it
(`dinov2-pipeline dvc-yaml`, checked in CI), with each stage's code deps and params sections derived from what
its module imports and reads (`tasks/dvc_yaml.py`), so only the data paths are written here."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.params import Params


@dataclass(frozen=True)
class DvcPath:
    """One data path of a stage in `dvc.yaml` (interpolated from params: `${section.key}`), with DVC's options."""

    path: str
    note: str = ""  # a comment written beside it in dvc.yaml
    options: dict[str, Any] = field(default_factory=dict)  # cache / persist / x / y / template


def _paths(items: tuple[str | DvcPath, ...]) -> tuple[DvcPath, ...]:
    return tuple(p if isinstance(p, DvcPath) else DvcPath(p) for p in items)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", imported only when the stage runs (keeps the CLI fast)
    summary: str
    deps: tuple[DvcPath, ...] = ()
    outs: tuple[DvcPath, ...] = ()
    plots: tuple[DvcPath, ...] = ()
    trains: bool = False  # runs torchrun workers: its module has build_spec(params) for tasks/train_worker.py

    def __post_init__(self) -> None:
        for name in ("deps", "outs", "plots"):
            object.__setattr__(self, name, _paths(getattr(self, name)))

    @property
    def module(self) -> str:
        return self.target.split(":")[0]

    @property
    def metrics(self) -> str:
        """Every stage writes its numbers here (`tasks.reports.write_metrics`); never cached, so `dvc metrics`
        reads them from the workspace."""
        return f"${{reports}}/metrics/{self.name}.json"

    def load(self) -> Callable[[Params], Any]:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


def _training(name: str, summary: str, deps: tuple[str | DvcPath, ...]) -> Stage:
    """pretrain / adapt / distill: resumable checkpoints (persisted, so `dvc repro` resumes a killed run), the
    exported weights, and the loss and k-NN-monitor curves."""
    eval_dir = DvcPath("${demo_data.out}/eval/classification", f"{name}.monitor.eval_dir may be null")
    uncached = {"cache": False}
    return Stage(
        name, f"tasks.{name}:run_{name}", summary, trains=True,
        deps=(*deps, f"${{{name}.data.shards}}", eval_dir),
        outs=(DvcPath(f"${{{name}.out}}/run", "checkpoints survive a killed run, so `dvc repro` resumes",
                    {"persist": True, "cache": False}),
              f"${{{name}.out}}/export"),
        plots=(DvcPath(f"${{reports}}/plots/{name}.csv", "", uncached | {"x": "step", "y": "loss_total"}),
               DvcPath(f"${{reports}}/figures/{name}_loss.png", "", uncached),
               DvcPath(f"${{reports}}/plots/{name}_knn.csv", "the k-NN monitor during training",
                     uncached | {"x": "images_seen", "y": "knn_top1"}),
               DvcPath(f"${{reports}}/figures/{name}_learning.png",
                     "teacher entropy vs ln K, feature spread, k-NN vs images seen", uncached)),
    )


# DAG order (paper §3 for curation, §4-5 for training).
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("demo-data", "tasks.demo_data:run_demo_data", "materialise the bundled raw crawl, seed and eval sets",
              outs=("${demo_data.out}",)),
        Stage("ingest", "tasks.ingest:run_ingest", "fetch, verify, normalise and store the crawl; quarantine bad files",
              deps=("${ingest.manifest}", DvcPath("${demo_data.out}/crawl", "the local files a demo manifest names")),
              outs=("${ingest.out}",)),
        Stage("dedup", "tasks.dedup:run_dedup", "drop near-duplicates: copy-detection kNN graph, one per component",
              deps=("${dedup.images}", DvcPath("${demo_data.out}/ground_truth.parquet",
                                             "dedup.ground_truth may be null: quality metrics only")),
              outs=("${dedup.out}",)),
        Stage("decontaminate", "tasks.decontaminate:run_decontaminate", "drop near-copies of evaluation images",
              deps=("${decontaminate.dedup}", "${decontaminate.images}", "${demo_data.out}/eval"),
              outs=("${decontaminate.out}",)),
        Stage("retrieve", "tasks.retrieve:run_retrieve", "curate the pool by similarity to the seed set",
              deps=("${retrieve.pool}", "${decontaminate.dedup}", "${retrieve.images}", "${retrieve.seed_index}"),
              outs=("${retrieve.out}",)),
        Stage("shards", "tasks.shards:run_shards", "write the curated images as WebDataset tar shards",
              deps=("${shards.curated}", "${shards.images}"),
              outs=(DvcPath("data/shards", "not ${shards.out}: that may be an s3:// prefix, which DVC cannot track"),)),
        _training("pretrain", "DINO + iBOT + KoLeo pre-training on the shards (torchrun, FSDP2)", ()),
        _training("adapt", "short high-resolution phase from the pre-training checkpoint", ("${adapt.init}",)),
        _training("distill", "distil the frozen adapted teacher into a smaller student (EMA kept)",
                  ("${distill.teacher}",)),
        Stage("eval", "tasks.eval:run_eval", "k-NN, linear probe, linear segmentation vs random-init and raw pixels",
              # the training stages' exports, not `${eval.backbones[i].weights}` (which would fix the list's length):
              # any number of backbones; the list itself is a tracked param
              deps=("${pretrain.out}/export", "${adapt.out}/export", "${distill.out}/export",
                    "${eval.classification}", "${eval.segmentation}"),
              outs=("${eval.out}",
                    DvcPath("${reports}/eval_summary.md",
                          "cached: `dinov2-pipeline fetch reports/eval_summary.md --run <id>` gets it back")),
              plots=(DvcPath("${reports}/plots/eval_knn.csv", "",
                           {"cache": False, "x": "k", "y": "top1", "template": "linear"}),
                     DvcPath("${reports}/figures/eval", "PCA maps and segmentation samples, one per backbone; "
                                                      "pushed with the run"))),
    ]
}
