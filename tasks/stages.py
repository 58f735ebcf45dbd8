"""The stage list: name -> the plain function that runs it. The CLI, DVC and the Prefect flow all use this."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tasks.params import Params


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", imported only when the stage runs (keeps the CLI fast)
    summary: str

    def load(self) -> Callable[[Params], Any]:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


# DAG order (paper §3 for curation, §4-5 for training); later stages are appended as they land.
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("demo-data", "tasks.demo_data:run_demo_data", "materialise the bundled raw crawl, seed and eval sets"),
        Stage("ingest", "tasks.ingest:run_ingest", "fetch, verify, normalise and store the crawl; quarantine bad files"),
        Stage("dedup", "tasks.dedup:run_dedup", "drop near-duplicates: copy-detection kNN graph, one per component"),
        Stage("decontaminate", "tasks.decontaminate:run_decontaminate", "drop near-copies of evaluation images"),
        Stage("retrieve", "tasks.retrieve:run_retrieve", "curate the pool by similarity to the seed set"),
        Stage("shards", "tasks.shards:run_shards", "write the curated images as WebDataset tar shards"),
        Stage("pretrain", "tasks.pretrain:run_pretrain", "DINO + iBOT + KoLeo pre-training on the shards (torchrun, FSDP2)"),
        Stage("adapt", "tasks.adapt:run_adapt", "short high-resolution phase from the pre-training checkpoint"),
        Stage("distill", "tasks.distill:run_distill", "distil the frozen adapted teacher into a smaller student (EMA kept)"),
        Stage("eval", "tasks.eval:run_eval", "k-NN, linear probe, linear segmentation vs random-init and raw pixels"),
    ]
}
