"""The stage list: name -> the plain function that runs it. The CLI, DVC and the Prefect flow all use this."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

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
    ]
}

PLANNED = ["dedup", "decontaminate", "retrieve", "shards", "pretrain", "adapt", "distill", "eval"]
