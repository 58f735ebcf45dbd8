"""Experiment tracking: where the training and eval stages' numbers go besides the run folder's CSVs.

DVCLive always (its files are DVC metrics and plots of the stage, so `dvc exp show` and `dvc plots diff` compare
runs); TensorBoard when `tracking.tensorboard_dir` is set (off by default). The training engine calls these as
`dinov2_core.train.engine.MetricSink`s on the main rank.
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from dinov2_core.atomic import atomic_path, atomic_write_text
from tasks.log import get_logger
from tasks.sections import TrackingParams

with warnings.catch_warnings():  # dvclive imports pynvml, which warns about its own name on import
    warnings.simplefilter("ignore", FutureWarning)
    from dvclive import Live
    from dvclive.plots import NumpyEncoder

logging.getLogger("dvclive").setLevel(logging.WARNING)  # "Logging to experiment ..." on every open
log = get_logger("tracking")


class _FilesOnlyLive(Live):
    """DVCLive's files, without its repository hooks. Our dvc.yaml declares these files as the stage's metrics and
    plots and the flow saves the experiment, so the hooks add nothing here; and they run `dvc init` in a plain git
    checkout and fail in one with no commit yet (dvclive 3.48 asks for HEAD before its no-commit check)."""

    def _init_dvc(self) -> None:
        return None

    def make_summary(self) -> None:
        """Atomically: DVCLive rewrites metrics.json in place at every step, so a run killed mid-write (SIGKILL, a lost
        node) left an empty file that `dvc metrics show` and the resumed run's DVCLive then failed to parse."""
        if self._step is not None:
            self.summary["step"] = self.step
        atomic_write_text(self.metrics_file, json.dumps(self.summary, indent=4, cls=NumpyEncoder) + "\n")

    def read_latest(self) -> dict:
        """A summary that does not parse (written by a version without the atomic write above) is only the latest
        values of the curve: a resumed run starts it afresh rather than fail; the curve itself is in plots/."""
        try:
            return super().read_latest()
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("%s does not parse (a run killed while writing it?): starting the summary afresh",
                        self.metrics_file)
            return {}

LIVE_DIR = "dvclive"  # under `reports`: <reports>/dvclive/<stage>/{metrics.json, plots/metrics/*.tsv, plots/images}


def live_dir(reports: str, stage: str) -> Path:
    return Path(reports) / LIVE_DIR / stage


def _truncate_tsv(folder: Path, start_step: int) -> None:
    """A resumed run restarts at its checkpoint: rows a killed run logged at or past it are dropped, as in
    log.csv, so no step appears twice."""
    for path in folder.rglob("*.tsv"):
        if path.name.startswith("."):  # a temporary file a killed write left behind
            continue
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
        if not rows or "step" not in rows[0]:
            continue
        col = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:] if len(r) > col and r[col].isdigit() and int(r[col]) < start_step]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:  # a kill here never leaves a shorter curve
            csv.writer(fh, delimiter="\t").writerows(kept)


class DvcLiveSink:
    """Per-step numbers into DVCLive's files (no dvc.yaml of its own: the stage's entry in ours declares them)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.live: _FilesOnlyLive | None = None

    def open(self, start_step: int) -> None:
        resume = start_step > 0 and (self.folder / "metrics.json").exists()
        if resume:
            _truncate_tsv(self.folder / "plots", start_step)
        self.live = _FilesOnlyLive(str(self.folder), resume=resume, save_dvc_exp=False, dvcyaml=None, report=None)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        assert self.live is not None, "open() first"
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value)
        self.live.make_summary()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
            self.live = None


class TensorBoardSink:
    """Per-step numbers as TensorBoard scalars (`tensorboard --logdir <tracking.tensorboard_dir>`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer = None

    def open(self, start_step: int) -> None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RuntimeError("tracking.tensorboard_dir is set but TensorBoard is not installed: "
                               "pip install 'dinov2-pipeline[tracking]', or set tracking.tensorboard_dir: null") from None
        # purge_step: a resumed run hides the events a killed run wrote past its checkpoint
        self.writer = SummaryWriter(str(self.folder), purge_step=start_step or None)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def stage_sinks(tracking: TrackingParams, reports: str, stage: str) -> list[DvcLiveSink | TensorBoardSink]:
    sinks: list[DvcLiveSink | TensorBoardSink] = [DvcLiveSink(live_dir(reports, stage))]
    if tracking.tensorboard_dir:
        sinks.append(TensorBoardSink(Path(tracking.tensorboard_dir) / stage))
    return sinks


def track_results(tracking: TrackingParams, reports: str, stage: str, table: list[dict],
                  figures: list[Path]) -> None:
    """A stage's result table (one row per `backbone`) as DVCLive metrics `<backbone>/<column>` (a column of
    `dvc exp show`), and table and figures in TensorBoard when it is on. The figures themselves are already DVC plots
    of the stage (`dvc plots diff` shows two runs' side by side)."""
    numbers = {f"{row['backbone']}/{key}": float(value) for row in table for key, value in row.items()
               if isinstance(value, int | float) and not isinstance(value, bool)}
    with _FilesOnlyLive(str(live_dir(reports, stage)), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for name, value in numbers.items():
            live.log_metric(name, value, plot=False)
    if tracking.tensorboard_dir:
        sink = TensorBoardSink(Path(tracking.tensorboard_dir) / stage)
        sink.open(0)
        sink.log(numbers, 0)
        for path in figures:
            sink.writer.add_image(path.stem, np.asarray(Image.open(path).convert("RGB")), 0, dataformats="HWC")
        sink.close()
