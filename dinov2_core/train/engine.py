"""The training driver every training stage runs in each ``torchrun`` process (or in a plain Python process):
build the meta-architecture, shard it with FSDP2 when there are several processes, resume from the newest checkpoint
of the same configuration (or start fresh), stream multi-crop batches from WebDataset shards, run the loop,
checkpoint atomically, monitor k-NN, and export in the official format.

Needs nothing from the pipeline around it: ``run_training(spec)`` with dataclass configs is pre-training from
Python (``tests/train/test_train_engine.py`` does it without the pipeline's packages). Run folder::

    <out>/run/checkpoints/step_N/  resumable checkpoints (dinov2_core.train.checkpoint), or under checkpoint_dir
    <out>/run/log.csv              one row per iteration (truncated to the checkpoint on resume)
    <out>/run/knn.csv              the k-NN monitor during training
    <out>/run/failure.txt          one line, only when the last run failed
    <out>/export/*.pth, model.json, summary.json
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from dinov2_core.config import DataConfig, MonitorConfig, MultiCropConfig, RuntimeConfig
from dinov2_core.data.batch_augment import BatchMultiCrop, renders_on
from dinov2_core.data.loader import SSLDataLoader, read_shard_index
from dinov2_core.eval.monitor import knn_probe
from dinov2_core.layers import checkpoint_blocks, compile_blocks
from dinov2_core.models import build_backbone

from ..atomic import atomic_path, atomic_write_text
from . import fsdp
from .checkpoint import Checkpointer, checkpoint_failure
from .export import sub_state
from .loop import NonFiniteLossError, build_optimizer, build_schedules, train_loop

log = logging.getLogger("dinov2.train")

FAULT_ENV = "DINOV2_FAULT_NAN_AT_STEP"  # test-only fault injection: the loss of that iteration becomes NaN
PACKAGE = Path(__file__).resolve().parents[1]  # dinov2_core/
# The library code a checkpoint's numbers depend on: a change means a fresh run, not a resume.
LIBRARY_CODE = ("config.py", "train/*.py", "loss/*.py", "models/*.py", "layers/*.py", "heads.py", "data/*.py")


@dataclass
class TrainSpec:
    """One training run: what to build and train, on which data, and how to export it."""

    stage: str
    out: Path
    build: Callable[[], Any]  # -> SSLMetaArch / DistillMetaArch (identical on every rank: after a shared seed)
    init_fresh: Callable[[Any], None]  # weights for a fresh start (before sharding), e.g. from a previous stage
    export: Callable[[dict[str, Any], Path, int], dict[str, Any]]  # (full state dict, export dir, step) -> summary
    data: DataConfig
    crops: MultiCropConfig
    loss: Any  # LossConfig (mask settings)
    optim: Any  # OptimConfig
    checkpoint_every: int
    checkpoint_keep: int
    digest_payload: dict[str, Any]  # what makes two runs the same run (resume only within one)
    checkpoint_dir: str | None = None  # None: <out>/run/checkpoints; or a shared folder / fsspec URL
    mask_student: bool = True
    exclude_from_checkpoint: tuple = ()
    export_parts: tuple = ("student", "teacher")  # sub-networks gathered (unsharded) for the export
    seed: int = 0
    extra_summary: dict[str, Any] = field(default_factory=dict)
    monitor: MonitorConfig | None = None  # k-NN of ``monitor_part``'s backbone every ``monitor.every`` iterations
    monitor_part: str = "teacher"  # "student_ema" for distillation: the result, not the frozen teacher
    code_files: tuple[Path, ...] = ()  # the caller's own code that shapes the run (part of the resume digest)


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_digest(extra: Iterable[Path] = ()) -> str:
    """Digest of the library code a run's numbers depend on, plus ``extra`` files (the caller's)."""
    h = hashlib.sha256()
    files = [p for pattern in LIBRARY_CODE for p in sorted(PACKAGE.glob(pattern))] + [Path(p) for p in extra]
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class MetricSink(Protocol):
    """Somewhere a run's numbers go besides ``log.csv`` / ``knn.csv``: an experiment tracker (the pipeline's DVCLive
    or TensorBoard), kept out of this library. Called on the main rank only; ``open(start_step)`` lets a resumed run
    drop what a killed run logged past its checkpoint."""

    def open(self, start_step: int) -> None: ...

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _numbers(record: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k not in ("step", "epoch") and isinstance(v, int | float) and not isinstance(v, bool)}


class TrainLog:
    """``log.csv``: one row per iteration, flushed as it goes; resuming at step s drops rows >= s."""

    COLUMNS: ClassVar[tuple[str, ...]] = (
        "step", "epoch", "loss_total", "loss_dino", "loss_dino_global", "loss_dino_local", "loss_ibot", "loss_koleo",
        "teacher_entropy_dino", "teacher_entropy_ibot", "student_entropy_dino", "cls_std",
        "lr", "wd", "momentum", "teacher_temp", "last_layer_lr", "grad_norm_backbone", "images_per_s", "step_s",
        "data_s")
    FIRST_KEPT: ClassVar[int] = 0  # rows with step < start_step are kept on resume (log.csv: iteration indices)

    def __init__(self, path: Path, start_step: int) -> None:
        self.path = path
        rows = []
        if path.exists() and start_step > 0:
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh)
                        if r.get("step", "").isdigit() and int(r["step"]) < start_step + self.FIRST_KEPT]
        path.parent.mkdir(parents=True, exist_ok=True)
        # the kept rows are written beside and swapped in, so a kill during a resume never leaves a shorter log
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(self.COLUMNS), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self.fh = open(path, "a", newline="")  # noqa: SIM115 - kept open for the run, closed by close()
        self.writer = csv.DictWriter(self.fh, fieldnames=list(self.COLUMNS), extrasaction="ignore")

    def write(self, record: dict[str, Any]) -> None:
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in record.items()})
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class KnnLog(TrainLog):
    """``knn.csv``: the k-NN monitor during training, one row per evaluation (``step`` = iterations completed)."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("step", "images_seen", "knn_top1", "seconds")
    FIRST_KEPT: ClassVar[int] = 1  # a row for n completed iterations belongs to a run resumed at step >= n


def make_loader(spec: TrainSpec, patch_size: int, rank: int, world: int, start_step: int, pin_memory: bool,
                opener: Callable[[str], Any] | None = None,
                augment_device: torch.device | None = None) -> SSLDataLoader:
    """The rank's batches from ``spec.data.shards`` (``opener(url)`` -> binary file object; default: fsspec); with
    ``augment_device`` the crops are rendered there and the workers only decode and plan them."""
    open_kw = {} if opener is None else {"opener": opener}
    index = read_shard_index(spec.data.shards, **open_kw)
    crops = spec.crops
    transform = BatchMultiCrop(
        global_crops_scale=tuple(crops.global_crops_scale), local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=crops.local_crops_number, global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size, blur_probs=tuple(crops.blur_probs),
        solarize_prob=crops.solarize_prob,
    )
    return SSLDataLoader(
        index, transform, global_batch_size=spec.data.global_batch_size, streams=spec.data.streams,
        patch_size=patch_size, global_crops_size=crops.global_crops_size, rank=rank, world_size=world,
        seed=spec.data.seed, start_step=start_step, num_workers=spec.data.num_workers, **open_kw,
        mask_ratio_tuple=tuple(spec.loss.mask_ratio_min_max),
        mask_probability=spec.loss.mask_sample_probability if spec.mask_student else 0.0, pin_memory=pin_memory,
        augment_device=augment_device,
    )


def crop_device(device: torch.device) -> torch.device | None:
    """Where the crops are rendered: on the training GPU (the loader workers only decode and draw the random choices,
    so a tiny model is not bound by the CPU's pixel work), else in the workers. A torchvision without that GPU's
    kernels keeps them in the workers, with a warning."""
    if device.type != "cuda":
        return None
    why = renders_on(device)
    if why is not None:
        log.warning("crops rendered by the loader workers, not on %s: %s", device, why)
        return None
    return device


def _fault_hook():
    at = os.environ.get(FAULT_ENV)
    if not at:
        return None
    at = int(at)

    def hook(step: int, losses):
        if step == at:
            losses = dict(losses)
            losses["total"] = losses["total"] * float("nan")
        return losses

    return hook


class _KnnMonitorHook:
    """``monitor(n)`` of the training loop: gathers the monitored backbone (a collective, every rank) and, on the
    main rank, appends its k-NN top-1 to ``knn.csv``."""

    def __init__(self, spec: TrainSpec, meta, info, run_dir: Path, start_step: int,
                 sinks: Sequence[MetricSink] = ()) -> None:
        self.spec, self.meta, self.info, self.sinks = spec, meta, info, sinks
        img_size = meta.backbone_cfg.img_size
        self.probe = knn_probe(spec.monitor, img_size, meta.backbone_cfg.patch_size) if info.is_main else None
        self.log = KnnLog(run_dir / "knn.csv", start_step) if info.is_main else None

    def __call__(self, n: int) -> None:
        started = time.perf_counter()
        state = sub_state(fsdp.full_state_dict(getattr(self.meta, self.spec.monitor_part)), "backbone.")
        if self.probe is None:
            return
        model = build_backbone(self.meta.backbone_cfg, with_drop_path=False)
        model.load_state_dict(state)
        top1 = self.probe(model)
        images_seen = n * self.spec.data.global_batch_size
        self.log.write({"step": n, "images_seen": images_seen, "knn_top1": round(top1, 4),
                        "seconds": round(time.perf_counter() - started, 2)})
        for sink in self.sinks:
            sink.log({"knn_top1": top1, "images_seen": images_seen}, n)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def _knn_monitor_hook(spec: TrainSpec, meta, info, run_dir: Path, start_step: int,
                      sinks: Sequence[MetricSink]) -> _KnnMonitorHook | None:
    if spec.monitor is None or not spec.monitor.every or not spec.monitor.eval_dir:
        return None  # decided from the config alone: every rank must agree, the hook runs a collective
    return _KnnMonitorHook(spec, meta, info, run_dir, start_step, sinks)


class _Records:
    """``on_record`` of the training loop on the main rank: ``log.csv`` and every sink."""

    def __init__(self, train_log: TrainLog, sinks: Sequence[MetricSink]) -> None:
        self.train_log, self.sinks = train_log, sinks

    def __call__(self, record: dict[str, Any]) -> None:
        self.train_log.write(record)
        numbers = _numbers(record)
        for sink in self.sinks:
            sink.log(numbers, int(record["step"]))


def _load_newest_readable(ckpt: Checkpointer, meta, optimizer, stage: str, is_main: bool) -> tuple[Any, dict]:
    """Resume from the newest checkpoint that loads. Saving is atomic, so one that does not load was damaged later (a
    disk or a copy); the one before it (``checkpoint.keep``) is tried, the damage said in the log. Every rank sees the
    same failure (DCP gathers them), so every rank falls back alike."""
    from torch.distributed.checkpoint.api import CheckpointException

    candidates = [path for _, path in reversed(ckpt.list())]
    first_error = ""
    for path in candidates:
        try:
            return path, ckpt.load(path, meta, optimizer)
        except (CheckpointException, RuntimeError, OSError, ValueError) as exc:
            why = _first_line(exc)
            first_error = first_error or f"{Path(str(path)).name}: {why}"
            if is_main:
                log.warning("%s: checkpoint %s cannot be read (%s); trying the one before it", stage, path, why)
    raise ValueError(f"{stage}: no checkpoint in {ckpt.root} can be read (newest {first_error}); delete the folder "
                     f"to start afresh")


def _first_line(exc: BaseException) -> str:
    exc = checkpoint_failure(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def run_training(spec: TrainSpec, runtime: RuntimeConfig | None = None, *,
                 opener: Callable[[str], Any] | None = None, storage_options: dict[str, Any] | None = None,
                 progress_kwargs: dict[str, Any] | None = None,
                 sinks: Sequence[MetricSink] = ()) -> dict[str, Any]:
    """Train ``spec`` in this process (one rank of a torchrun group, or a one-process group of its own) and export
    it; returns the export summary on the main rank (``{}`` elsewhere). Raises ``SystemExit(3)`` with
    ``<out>/run/failure.txt`` written when a loss turns non-finite (the last good checkpoint is kept).
    ``opener`` reads the shards, ``storage_options`` are fsspec options for a checkpoint URL, ``sinks`` receive
    every iteration's numbers and the k-NN monitor (main rank)."""
    runtime = runtime or RuntimeConfig()
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # outputs are never modified in place
    info = fsdp.init_distributed(runtime.device, timeout_s=runtime.timeout_s)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    run_dir = spec.out / "run"
    ckpt_root = spec.checkpoint_dir or run_dir / "checkpoints"
    ckpt = Checkpointer(ckpt_root, keep=spec.checkpoint_keep, exclude_prefixes=spec.exclude_from_checkpoint,
                        storage_options=storage_options)
    run_digest = digest({**spec.digest_payload, "code": code_digest(spec.code_files)})
    try:
        torch.manual_seed(spec.seed)  # identical initial weights on every rank, whatever the world size
        meta = spec.build()
        latest = ckpt.latest()
        if latest is not None and ckpt.read_meta(latest).get("digest") != run_digest:
            if info.is_main:
                log.info("%s: checkpoints in %s belong to another configuration; starting afresh", spec.stage,
                         ckpt.root)
            ckpt.clear()
            latest = None
        if latest is None:
            spec.init_fresh(meta)
        pack = runtime.pack_sequences
        meta.set_pack_sequences(info.device.type == "cuda" if pack == "auto" else pack == "on")
        meta.to(info.device)
        if runtime.compile:  # before sharding: FSDP's hooks stay outside the compiled graphs
            compile_blocks(meta)
        if runtime.activation_checkpointing:  # after compiling (it wraps the compiled blocks), before sharding
            checkpoint_blocks(meta)
        meta.compute_dtype = fsdp.shard_meta_arch(meta, info, runtime.precision,
                                                  shard_single_process=runtime.fsdp == "on")
        optimizer = build_optimizer(meta, spec.optim)
        schedules = build_schedules(spec.optim, spec.data.global_batch_size)
        ckpt.clean_partial()
        start_step = 0
        if latest is not None:
            latest, state = _load_newest_readable(ckpt, meta, optimizer, spec.stage, info.is_main)
            start_step = int(state["step"])
            if not state["rng_restored"]:
                torch.manual_seed(spec.seed * 1000 + info.rank + 7919 * start_step)
            if info.is_main:
                log.info("%s: resumed from %s (iteration %d)", spec.stage, latest, start_step)
        else:
            torch.manual_seed(spec.seed * 1000 + info.rank + 1)  # drop-path etc. differ across ranks
        total = spec.optim.total_steps
        train_log = TrainLog(run_dir / "log.csv", start_step) if info.is_main else None
        sinks = tuple(sinks) if info.is_main else ()
        for sink in sinks:
            sink.open(start_step)
        monitor = _knn_monitor_hook(spec, meta, info, run_dir, start_step, sinks)
        loader = make_loader(spec, meta.backbone_cfg.patch_size, info.rank, info.world_size, start_step,
                             pin_memory=info.device.type == "cuda", opener=opener,
                             augment_device=crop_device(info.device))

        def save(n: int) -> None:
            meta.flush_center_updates()
            ckpt.save(n, meta, optimizer, {"digest": run_digest, "stage": spec.stage, "total_steps": total,
                                           "data": {"position": n, "global_batch_size": spec.data.global_batch_size,
                                                    "streams": spec.data.streams, "seed": spec.data.seed}})

        batches = iter(loader)
        try:
            result = train_loop(
                meta, optimizer, schedules, batches, start_step=start_step, total_steps=total, device=info.device,
                global_batch_size=spec.data.global_batch_size, clip_grad=spec.optim.clip_grad,
                epoch_length=spec.optim.epoch_length, checkpoint_every=spec.checkpoint_every, save_checkpoint=save,
                monitor_every=spec.monitor.every if spec.monitor else 0, monitor=monitor,
                on_record=_Records(train_log, sinks) if train_log else None, loss_hook=_fault_hook(),
                show_progress=info.is_main, progress_kwargs=progress_kwargs, desc=spec.stage,
            )
        except NonFiniteLossError as exc:
            last = ckpt.latest()
            kept = f"last good checkpoint kept: {last}" if last else "no checkpoint was written yet"
            message = f"{spec.stage}: {exc}; stopped before the optimizer step, {kept}"
            if info.is_main:
                atomic_write_text(run_dir / "failure.txt", message + "\n")
                log.error(message)
            raise SystemExit(3) from None
        finally:
            batches.close()
            if train_log:
                train_log.close()
            if monitor is not None:
                monitor.close()
            for sink in sinks:
                sink.close()
        if start_step >= total and latest is not None and info.is_main:
            log.info("%s: already complete at iteration %d; re-exporting", spec.stage, total)
        meta.flush_center_updates()
        full = {f"{part}.{k}": v for part in spec.export_parts
                for k, v in fsdp.full_state_dict(getattr(meta, part)).items()}
        full["dino_loss.center"] = meta.dino_loss.center.detach().cpu().clone()
        full["ibot_patch_loss.center"] = meta.ibot_patch_loss.center.detach().cpu().clone()
        summary: dict[str, Any] = {}
        if info.is_main:
            export_dir = spec.out / "export"
            summary = spec.export(full, export_dir, result.last_step)
            summary.update(spec.extra_summary, stage=spec.stage, world_size=info.world_size,
                           device=str(info.device), resumed_from=start_step, iterations_run=result.records,
                           train_seconds=round(result.seconds, 3), digest=run_digest,
                           precision=str(meta.compute_dtype or torch.float32))
            atomic_write_text(export_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
        fsdp.barrier()
        return summary
    finally:
        fsdp.destroy_distributed()


__all__ = ["FAULT_ENV", "DataConfig", "KnnLog", "MetricSink", "MultiCropConfig", "RuntimeConfig", "TrainLog", "TrainSpec",
           "code_digest", "digest", "make_loader", "run_training"]
