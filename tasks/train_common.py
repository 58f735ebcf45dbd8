"""What the three training stages (pretrain, adapt, distill) share.

Launcher side (the stage function, one process): validate inputs, write the resolved params next to the run, start
``torchrun`` (single process by default; ``launch.*`` params for more), turn a worker failure into one line, then
write the reports (per-step CSV for DVC plots, loss-curve PNG, GX check of the log and of the export, metrics JSON,
k-NN monitor).

Worker side (every torchrun process, via ``tasks/train_worker.py``): build the meta-architecture, shard it with
FSDP2, resume from the newest checkpoint of the same configuration (or start fresh), stream batches from the shards,
run the loop, checkpoint atomically, export in the official format.

Run folder (``<out>/run``, kept between runs so a killed run resumes) and exports (``<out>/export``)::

    <out>/run/params.yaml          the resolved params the workers read
    <out>/run/checkpoints/step_N/  resumable checkpoints (dinov2_core.train.checkpoint), or under checkpoint.dir
    <out>/run/log.csv              one row per iteration (truncated to the checkpoint on resume)
    <out>/run/failure.txt          one line, only when the last run failed
    <out>/export/*.pth, model.json, summary.json
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from tasks.log import get_logger, progress_kwargs
from tasks.params import (
    CropsParams,
    KnnMonitorParams,
    LaunchParams,
    LossParams,
    ModelParams,
    OptimParams,
    Params,
    ParamsError,
    TrainDataParams,
)

log = get_logger("train")

ROOT = Path(__file__).resolve().parents[1]
FAULT_ENV = "DINOV2_FAULT_NAN_AT_STEP"  # test-only fault injection: the loss of that iteration becomes NaN


class TrainingFailed(RuntimeError):
    """The torchrun workers failed; the message is the one line the failing rank wrote."""


# ============================================================================================== params -> configs
def backbone_config(model: ModelParams, img_size: int):
    from dinov2_core.train.config import BackboneConfig

    return BackboneConfig(
        arch=model.arch, patch_size=model.patch_size, img_size=img_size, num_register_tokens=model.num_register_tokens,
        layerscale=model.layerscale, ffn_layer=model.ffn_layer, drop_path_rate=model.drop_path_rate,
        drop_path_uniform=model.drop_path_uniform, interpolate_antialias=model.interpolate_antialias,
        interpolate_offset=model.interpolate_offset, depth=model.depth, embed_dim=model.embed_dim,
        num_heads=model.num_heads,
    )


def loss_config(loss: LossParams):
    from dinov2_core.train.config import HeadConfig, LossConfig

    return LossConfig(
        dino_loss_weight=loss.dino_loss_weight, koleo_loss_weight=loss.koleo_loss_weight,
        ibot_loss_weight=loss.ibot_loss_weight, ibot_separate_head=loss.ibot_separate_head,
        dino_head=HeadConfig(**loss.dino_head.model_dump()), ibot_head=HeadConfig(**loss.ibot_head.model_dump()),
        centering=loss.centering, mask_sample_probability=loss.mask_sample_probability,
        mask_ratio_min_max=tuple(loss.mask_ratio_min_max),
    )


def optim_config(optim: OptimParams):
    from dinov2_core.train.config import OptimConfig

    return OptimConfig(**optim.model_dump())


def check_crops(section: str, crops: CropsParams, patch_size: int) -> None:
    for name in ("global_crops_size", "local_crops_size"):
        if getattr(crops, name) % patch_size:
            raise ParamsError(f"{section}.crops.{name}: {getattr(crops, name)} is not a multiple of the patch size "
                              f"{patch_size}")


def check_batch(section: str, data: TrainDataParams, launch: LaunchParams) -> None:
    world = launch.nproc_per_node * launch.nnodes
    if data.global_batch_size % world:
        raise ParamsError(f"{section}.data.global_batch_size: {data.global_batch_size} is not divisible by the "
                          f"{world} training processes")
    if data.streams % world or data.global_batch_size % data.streams:
        raise ParamsError(f"{section}.data.streams: {data.streams} must be a multiple of the {world} training "
                          f"processes and divide global_batch_size ({data.global_batch_size})")


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The code a checkpoint's numbers depend on: a change means a fresh run, not a resume (DVC reruns on code changes).
CODE_GLOBS = ("dinov2_core/train/*.py", "dinov2_core/loss/*.py", "dinov2_core/models/*.py", "dinov2_core/layers/*.py",
              "dinov2_core/heads.py", "dinov2_core/data/*.py", "tasks/train_common.py", "tasks/pretrain.py",
              "tasks/adapt.py", "tasks/distill.py")


def code_digest() -> str:
    h = hashlib.sha256()
    for pattern in CODE_GLOBS:
        for path in sorted(ROOT.glob(pattern)):
            h.update(path.relative_to(ROOT).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


# ============================================================================================== launcher side
def _omp_threads(launch: LaunchParams) -> int:
    if launch.omp_threads:
        return launch.omp_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // launch.nproc_per_node)


def torchrun_command(stage: str, params_file: Path, launch: LaunchParams) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(launch.nproc_per_node)]
    if launch.nnodes == 1 and launch.master_port == 0:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(launch.nnodes), "--node_rank", str(launch.node_rank),
                "--master_addr", launch.master_addr, "--master_port", str(launch.master_port)]
    return cmd + ["-m", "tasks.train_worker", stage, "--params", str(params_file)]


def launch_workers(stage: str, params: Params, out: Path, extra_env: dict[str, str] | None = None) -> Path:
    """Write the resolved params under ``<out>/run``, run the torchrun workers, return the run folder.

    Raises TrainingFailed with the failing rank's one-line reason.
    """
    ckpt_dir = getattr(params, stage).checkpoint.dir
    if ckpt_dir and "://" in ckpt_dir:
        from tasks.storage import Storage

        # before any worker starts: an unreachable store or rejected keys is one line here, not N rank tracebacks
        Storage.from_params(params.storage).exists(ckpt_dir)
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    params_file = run_dir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    failure = run_dir / "failure.txt"
    failure.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update(extra_env or {})
    env["OMP_NUM_THREADS"] = str(_omp_threads(params.launch))
    if params.launch.nproc_per_node > 1 or getattr(params, stage).data.num_workers > 0:
        # busy-waiting OpenMP threads stall cores shared with other ranks or loader workers; alone, spinning is
        # faster (one process, 2 threads, no workers: 0.445 vs 0.522 s per default-profile step)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("TORCHELASTIC_ERROR_FILE", str(run_dir / "torchelastic_error.json"))
    cmd = torchrun_command(stage, params_file, params.launch)
    log.info("%s: %s", stage, " ".join(cmd[2:]))
    try:  # worker output joins the stage's stderr (progress bars, logs); stdout stays clean for callers
        stdout = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        stdout = None
    proc = subprocess.Popen(cmd, env=env, cwd=os.getcwd(), stdout=stdout, preexec_fn=die_with_parent)  # noqa: PLW1509
    try:
        code = proc.wait()
    except BaseException:  # Ctrl-C or a Prefect cancel: do not leave workers behind
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if code != 0:
        reason = failure.read_text().strip().splitlines()[0] if failure.exists() else ""
        raise TrainingFailed(reason or f"{stage}: torchrun exited with code {code} (see the log above)")
    return run_dir


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies (call it in the child), so a killed stage never
    leaves training behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: S110 - best effort (non-Linux)
        pass


# ============================================================================================== worker side
@dataclass
class TrainSpec:
    """What differs between the stages; ``run_worker`` does the rest."""

    stage: str
    out: Path
    build: Callable[[], Any]  # -> SSLMetaArch (identical on every rank: called after a shared manual_seed)
    init_fresh: Callable[[Any], None]  # weights for a fresh start (before sharding), e.g. from a previous stage
    export: Callable[[dict[str, Any], Path, int], dict[str, Any]]  # (full state dict, export dir, step) -> summary
    data: TrainDataParams
    crops: CropsParams
    loss: Any  # LossConfig (mask settings)
    optim: Any  # OptimConfig
    checkpoint_every: int
    checkpoint_keep: int
    digest_payload: dict[str, Any]
    checkpoint_dir: str | None = None  # None: <out>/run/checkpoints
    mask_student: bool = True
    exclude_from_checkpoint: tuple = ()
    export_parts: tuple = ("student", "teacher")  # sub-networks gathered (unsharded) for the export
    seed: int = 0
    extra_summary: dict[str, Any] = field(default_factory=dict)
    monitor: KnnMonitorParams | None = None  # k-NN of ``monitor_part``'s backbone every ``monitor.every`` iterations
    monitor_part: str = "teacher"  # "student_ema" for distillation: the result, not the frozen teacher


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
        self.fh = open(path, "w", newline="")  # noqa: SIM115 - kept open for the run, closed by close()
        self.writer = csv.DictWriter(self.fh, fieldnames=list(self.COLUMNS), extrasaction="ignore")
        self.writer.writeheader()
        for r in rows:
            self.writer.writerow(r)
        self.fh.flush()

    def write(self, record: dict[str, Any]) -> None:
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in record.items()})
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class KnnLog(TrainLog):
    """``knn.csv``: the k-NN monitor during training, one row per evaluation (``step`` = iterations completed)."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("step", "images_seen", "knn_top1", "seconds")
    FIRST_KEPT: ClassVar[int] = 1  # a row for n completed iterations belongs to a run resumed at step >= n


def knn_probe(monitor: KnnMonitorParams, img_size: int, patch_size: int):
    """The labelled monitor split, preprocessed once (official eval transform at the training resolution), as a
    :class:`dinov2_core.eval.KnnProbe`; None when there is no labelled set."""
    import torch
    from PIL import Image

    from dinov2_core.eval import KnnProbe
    from dinov2_core.eval.features import EvalTransformConfig

    if not monitor.eval_dir or not (Path(monitor.eval_dir) / "train.csv").exists():
        return None
    eval_dir = Path(monitor.eval_dir)
    tf = EvalTransformConfig(resize_size=img_size, crop_size=img_size, patch_size=patch_size).build()

    def load(split: str, n: int):
        table = _labelled(eval_dir, split, n)
        images = torch.stack([tf(Image.open(eval_dir / p).convert("RGB")) for p in table["path"]])
        return images, torch.as_tensor(table["label"].to_numpy().copy())

    return KnnProbe(*load("train", monitor.n_train), *load("test", monitor.n_test), k=monitor.k)


def storage_opener(params: Params):
    from tasks.storage import Storage

    return Storage.from_params(params.storage).open_read


def make_loader(spec: TrainSpec, params: Params, patch_size: int, rank: int, world: int, start_step: int,
                pin_memory: bool):
    from dinov2_core.data.batch_augment import BatchMultiCrop
    from dinov2_core.data.loader import SSLDataLoader, read_shard_index

    opener = storage_opener(params)
    index = read_shard_index(spec.data.shards, opener=opener)
    crops = spec.crops
    transform = BatchMultiCrop(
        global_crops_scale=tuple(crops.global_crops_scale), local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=crops.local_crops_number, global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
    )
    return SSLDataLoader(
        index, transform, global_batch_size=spec.data.global_batch_size, streams=spec.data.streams,
        patch_size=patch_size, global_crops_size=crops.global_crops_size, rank=rank, world_size=world,
        seed=spec.data.seed, start_step=start_step, num_workers=spec.data.num_workers, opener=opener,
        mask_ratio_tuple=tuple(spec.loss.mask_ratio_min_max),
        mask_probability=spec.loss.mask_sample_probability if spec.mask_student else 0.0, pin_memory=pin_memory,
    )


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


def run_worker(spec: TrainSpec, params: Params) -> dict[str, Any]:
    """One torchrun process of a training stage (see the module docstring)."""
    import warnings

    import torch

    from dinov2_core.train import fsdp
    from dinov2_core.train.checkpoint import Checkpointer, atomic_write_text
    from dinov2_core.train.loop import NonFiniteLossError, build_optimizer, build_schedules, train_loop
    from tasks.storage import Storage

    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")  # outputs are never modified in place
    info = fsdp.init_distributed(params.launch.device, timeout_s=params.launch.timeout_s)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    run_dir = spec.out / "run"
    ckpt_root = spec.checkpoint_dir or run_dir / "checkpoints"
    ckpt = Checkpointer(ckpt_root, keep=spec.checkpoint_keep, exclude_prefixes=spec.exclude_from_checkpoint,
                        storage_options=Storage.from_params(params.storage).fsspec_options(str(ckpt_root)))
    run_digest = digest({**spec.digest_payload, "code": code_digest()})
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
        pack = params.launch.pack_sequences
        meta.set_pack_sequences(info.device.type == "cuda" if pack == "auto" else pack == "on")
        meta.to(info.device)
        meta.compute_dtype = fsdp.shard_meta_arch(meta, info, params.launch.precision,
                                                  shard_single_process=params.launch.fsdp == "on")
        optimizer = build_optimizer(meta, spec.optim)
        schedules = build_schedules(spec.optim, spec.data.global_batch_size)
        ckpt.clean_partial()
        start_step = 0
        if latest is not None:
            state = ckpt.load(latest, meta, optimizer)
            start_step = int(state["step"])
            if not state["rng_restored"]:
                torch.manual_seed(spec.seed * 1000 + info.rank + 7919 * start_step)
            if info.is_main:
                log.info("%s: resumed from %s (iteration %d)", spec.stage, latest, start_step)
        else:
            torch.manual_seed(spec.seed * 1000 + info.rank + 1)  # drop-path etc. differ across ranks
        total = spec.optim.total_steps
        train_log = TrainLog(run_dir / "log.csv", start_step) if info.is_main else None
        monitor = _knn_monitor_hook(spec, meta, info, run_dir, start_step)
        loader = make_loader(spec, params, meta.backbone_cfg.patch_size, info.rank, info.world_size, start_step,
                             pin_memory=info.device.type == "cuda")

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
                on_record=train_log.write if train_log else None, loss_hook=_fault_hook(), show_progress=info.is_main,
                progress_kwargs=progress_kwargs(), desc=spec.stage,
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


class _KnnMonitorHook:
    """``monitor(n)`` of the training loop: gathers the monitored backbone (a collective, every rank) and, on the
    main rank, appends its k-NN top-1 to ``knn.csv``."""

    def __init__(self, spec: TrainSpec, meta, info, run_dir: Path, start_step: int) -> None:
        self.spec, self.meta, self.info = spec, meta, info
        img_size = meta.backbone_cfg.img_size
        self.probe = knn_probe(spec.monitor, img_size, meta.backbone_cfg.patch_size) if info.is_main else None
        self.log = KnnLog(run_dir / "knn.csv", start_step) if info.is_main else None

    def __call__(self, n: int) -> None:
        from dinov2_core.train import fsdp

        started = time.perf_counter()
        state = sub_state(fsdp.full_state_dict(getattr(self.meta, self.spec.monitor_part)), "backbone.")
        if self.probe is None:
            return
        model = self.meta.backbone_cfg.build(with_drop_path=False)
        model.load_state_dict(state)
        top1 = self.probe(model)
        self.log.write({"step": n, "images_seen": n * self.spec.data.global_batch_size, "knn_top1": round(top1, 4),
                        "seconds": round(time.perf_counter() - started, 2)})

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


def _knn_monitor_hook(spec: TrainSpec, meta, info, run_dir: Path, start_step: int) -> _KnnMonitorHook | None:
    if spec.monitor is None or not spec.monitor.every or not spec.monitor.eval_dir:
        return None  # decided from params alone: every rank must agree, the hook runs a collective
    return _KnnMonitorHook(spec, meta, info, run_dir, start_step)


# ============================================================================================== exports
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sub_state(full: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}


def write_model_json(export_dir: Path, backbone_cfg, files: dict[str, Path], extra: dict[str, Any]) -> dict[str, Any]:
    from dinov2_core.train.checkpoint import atomic_write_text

    hub_name, hub_kwargs = backbone_cfg.hub_spec()
    info = {
        "format": "dinov2-official-state-dict",
        "hub": {"constructor": f"dinov2_core.hub.{hub_name}", "kwargs": hub_kwargs},
        "backbone": backbone_cfg.as_dict(),
        # paths relative to this file: the export folder stays valid wherever DVC / S3 puts it
        "files": {name: {"path": os.path.relpath(p, export_dir), "sha256": sha256_file(p), "bytes": p.stat().st_size}
                  for name, p in files.items()},
        **extra,
    }
    atomic_write_text(export_dir / "model.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


# ============================================================================================== reports
def read_log(run_dir: Path):
    import pandas as pd

    path = run_dir / "log.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=list(TrainLog.COLUMNS))


def loss_curve_png(frame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for col, label in (("loss_total", "total"), ("loss_dino", "DINO"), ("loss_ibot", "iBOT"), ("loss_koleo", "KoLeo")):
        if col in frame and len(frame):
            axes[0].plot(frame["step"], frame[col], label=label, lw=1)
    axes[0].set(xlabel="iteration", ylabel="loss", title=title)
    axes[0].legend(fontsize=8)
    if len(frame):
        axes[1].plot(frame["step"], frame["lr"], label="lr")
        axes[1].plot(frame["step"], frame["last_layer_lr"], label="last-layer lr", ls="--")
        ax2 = axes[1].twinx()
        ax2.plot(frame["step"], frame["wd"], color="gray", label="wd")
        axes[2].plot(frame["step"], frame["teacher_temp"], label="teacher temp")
        ax3 = axes[2].twinx()
        ax3.plot(frame["step"], frame["momentum"], color="tab:orange", label="EMA momentum")
        ax3.legend(fontsize=8, loc="lower right")
    axes[1].set(xlabel="iteration", title="lr (left), wd (right)")
    axes[1].legend(fontsize=8)
    axes[2].set(xlabel="iteration", title="teacher temperature (left), EMA momentum (right)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def read_knn_log(run_dir: Path):
    import pandas as pd

    path = run_dir / "knn.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=list(KnnLog.COLUMNS))


def prototype_counts(loss) -> dict[str, int]:
    """{"dino": K, "ibot": K'} of a LossConfig / LossParams / its dict (the ln K references of the diagnostics)."""
    get = (lambda o, k: o[k]) if isinstance(loss, dict) else getattr
    dino = int(get(get(loss, "dino_head"), "n_prototypes"))
    ibot = int(get(get(loss, "ibot_head"), "n_prototypes")) if get(loss, "ibot_separate_head") else dino
    return {"dino": dino, "ibot": ibot}


def learning_curve_png(frame, knn, path: Path, title: str, n_prototypes: dict[str, int], embed_dim: int) -> Path:
    """The learning-vs-collapse picture: DINO / iBOT losses next to the teacher's target entropy and ln K (targets at
    ln K: no signal), the CLS feature spread next to 1/sqrt(D) (towards 0: collapse), and k-NN vs images seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    has = lambda c: c in frame and len(frame) and frame[c].notna().any()
    for ax, head in ((axes[0], "dino"), (axes[1], "ibot")):
        for col, label, style in ((f"teacher_entropy_{head}", "teacher target entropy", "-"),
                                  (f"student_entropy_{head}", "student entropy", "--")):
            if has(col):
                ax.plot(frame["step"], frame[col], lw=1, ls=style, label=label)
        k = n_prototypes.get(head)
        if k:
            ax.axhline(math.log(k), color="k", lw=0.8, ls=":", label=f"ln K = {math.log(k):.2f} (uniform)")
        ax.set(xlabel="iteration", ylabel="nats", title=f"{title}: {'DINO (CLS)' if head == 'dino' else 'iBOT (patches)'}")
    if has("loss_dino"):  # cross-entropy = teacher entropy + KL: the gap to the teacher entropy is what is learnt
        axes[0].plot(frame["step"], frame["loss_dino"], lw=1, label="DINO loss (cross-entropy)")
    if has("loss_ibot"):  # official normalisation: a mean over all global crops, masked or not
        twin = axes[1].twinx()
        twin.plot(frame["step"], frame["loss_ibot"], lw=0.8, color="tab:green", label="iBOT loss (right)")
        twin.legend(fontsize=7, loc="lower right")
    for ax in axes[:2]:
        ax.legend(fontsize=7, loc="lower left")
    if has("cls_std"):
        axes[2].plot(frame["step"], frame["cls_std"], lw=1, label="CLS per-dim std")
    axes[2].axhline(1 / math.sqrt(embed_dim), color="k", lw=0.8, ls=":", label="1/sqrt(D): spread")
    axes[2].set_ylim(bottom=0)
    if has("loss_koleo"):
        ax2 = axes[2].twinx()
        ax2.plot(frame["step"], frame["loss_koleo"], color="tab:orange", lw=0.8, label="KoLeo")
        ax2.legend(fontsize=7, loc="lower right")
    axes[2].set(xlabel="iteration", title="feature spread (left), KoLeo (right)")
    axes[2].legend(fontsize=7, loc="lower left")
    if len(knn):
        axes[3].plot(knn["images_seen"], knn["knn_top1"], marker="o")
    axes[3].set(xlabel="images seen", ylabel="k-NN top-1", title="k-NN monitor during training")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def learning_summary(stage: str, frame, knn, n_prototypes: dict[str, int], embed_dim: int,
                     tail: int = 20) -> dict[str, Any]:
    """End-of-run diagnostics for the metrics file: means over the last iterations, the k-NN curve, warnings."""
    from dinov2_core.train.diagnostics import learning_warnings

    end = frame.tail(min(tail, len(frame))) if len(frame) else frame
    mean = lambda c: float(end[c].mean()) if c in end and len(end) and end[c].notna().any() else None
    out: dict[str, Any] = {f"{c}_end_mean": mean(c) for c in
                           ("teacher_entropy_dino", "teacher_entropy_ibot", "student_entropy_dino", "cls_std")}
    out["ln_k_dino"] = math.log(n_prototypes["dino"])
    if mean("loss_dino") is not None and out["teacher_entropy_dino_end_mean"] is not None:
        out["dino_kl_gap_end_mean"] = mean("loss_dino") - out["teacher_entropy_dino_end_mean"]
    out["knn_vs_images_seen"] = [{"images_seen": int(r.images_seen), "top1": float(r.knn_top1)}
                                 for r in knn.itertuples()]
    out["warnings"] = learning_warnings(stage, dino_loss_end=mean("loss_dino"), n_prototypes=n_prototypes["dino"],
                                        cls_std_end=out["cls_std_end_mean"], embed_dim=embed_dim)
    for w in out["warnings"]:
        log.warning(w)
    return out


def log_checks(frame, total_steps: int):
    """GX suite of the training log: one row per iteration, finite losses, schedules in range."""
    import great_expectations.expectations as gxe

    from tasks.quality import TableCheck

    finite = frame.copy()
    for col in ("loss_total", "loss_dino", "loss_ibot", "loss_koleo"):
        finite[col + "_finite"] = [math.isfinite(float(v)) for v in frame[col]] if len(frame) else []
    return TableCheck("log", finite, [
        gxe.ExpectTableRowCountToEqual(value=total_steps),
        gxe.ExpectColumnValuesToBeUnique(column="step"),
        gxe.ExpectColumnValuesToBeBetween(column="step", min_value=0, max_value=max(0, total_steps - 1)),
        *[gxe.ExpectColumnValuesToBeInSet(column=c + "_finite", value_set=[True])
          for c in ("loss_total", "loss_dino", "loss_ibot", "loss_koleo")],
        gxe.ExpectColumnValuesToBeBetween(column="lr", min_value=0.0),
        gxe.ExpectColumnValuesToBeBetween(column="momentum", min_value=0.0, max_value=1.0),
    ])


def export_checks(export_dir: Path, names: list[str]):
    import great_expectations.expectations as gxe
    import pandas as pd

    from dinov2_core.hub import load_export
    from tasks.quality import TableCheck

    rows = []
    for name in names:
        ok, reason = True, ""
        try:
            load_export(export_dir / "model.json", name)
        except Exception as exc:  # the check records why
            ok, reason = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append({"file": name, "loads_strict": ok, "reason": reason})
    frame = pd.DataFrame(rows, columns=["file", "loads_strict", "reason"])
    return TableCheck("export", frame, [gxe.ExpectColumnValuesToBeInSet(column="loads_strict", value_set=[True]),
                                        gxe.ExpectTableRowCountToEqual(value=len(names))])


def summarise_log(frame, tail: int = 20) -> dict[str, Any]:
    if not len(frame):
        return {}
    head = frame.head(min(tail, len(frame)))
    end = frame.tail(min(tail, len(frame)))
    out = {
        "iterations": len(frame),
        "loss_first": float(frame["loss_total"].iloc[0]),
        "loss_last": float(frame["loss_total"].iloc[-1]),
        "loss_start_mean": float(head["loss_total"].mean()),
        "loss_end_mean": float(end["loss_total"].mean()),
        "images_per_s_median": float(frame["images_per_s"].iloc[1:].median()) if len(frame) > 1 else None,
    }
    for k in ("dino", "ibot", "koleo"):
        out[f"{k}_start_mean"] = float(head[f"loss_{k}"].mean())
        out[f"{k}_end_mean"] = float(end[f"loss_{k}"].mean())
    return out


def write_training_reports(stage: str, params: Params, run_dir: Path, total_steps: int, export_dir: Path,
                           export_names: list[str], metrics: dict[str, Any], n_prototypes: dict[str, int],
                           embed_dim: int) -> dict[str, Any]:
    """Per-step CSV, k-NN-during-training CSV, loss and learning figures, GX checks, metrics with warnings.
    ``n_prototypes`` ({"dino": K, "ibot": K'}) and ``embed_dim`` (student) set the ln K / 1/sqrt(D) references."""
    from tasks.quality import validate_stage
    from tasks.reports import write_metrics, write_plot_csv

    frame, knn = read_log(run_dir), read_knn_log(run_dir)
    write_plot_csv(params.reports, stage, frame)
    write_plot_csv(params.reports, f"{stage}_knn", knn)
    figures = Path(params.reports) / "figures"
    loss_curve_png(frame, figures / f"{stage}_loss.png", f"{stage} losses")
    learning_curve_png(frame, knn, figures / f"{stage}_learning.png", stage, n_prototypes, embed_dim)
    validate_stage(stage, [log_checks(frame, total_steps), export_checks(export_dir, export_names)], params.reports)
    metrics = {**summarise_log(frame), **learning_summary(stage, frame, knn, n_prototypes, embed_dim), **metrics}
    write_metrics(params.reports, stage, metrics)
    return metrics


# ============================================================================================== k-NN monitor
def _labelled(eval_dir: Path, split: str, n: int):
    import pandas as pd

    table = pd.read_csv(eval_dir / f"{split}.csv")
    return table.iloc[:n]


def knn_monitor(monitor: KnnMonitorParams, models: dict[str, Any], img_size: int, patch_size: int) -> dict[str, Any]:
    """k-NN top-1 of each model on the labelled eval split, plus linear CKA of every model against the first one."""
    import torch

    from dinov2_core.eval import knn_classify

    start = time.perf_counter()
    probe = knn_probe(monitor, img_size, patch_size)
    if probe is None:
        return {"skipped": f"no labelled eval set at {monitor.eval_dir!r}"}
    out: dict[str, Any] = {"eval_dir": str(monitor.eval_dir), "k": monitor.k, "img_size": img_size}
    test_feats = {}
    torch_threads = torch.get_num_threads()
    for name, model in models.items():
        xtr, xte = probe.features(model, probe.train_images), probe.features(model, probe.test_images)
        res = knn_classify(xtr, probe.train_labels, xte, probe.test_labels, ks=(monitor.k,))
        out[f"{name}_top1"] = round(float(next(iter(res.values()))["top1"]), 4)
        test_feats[name] = xte
    ref = next(iter(test_feats))
    for name, feats in test_feats.items():
        if name != ref:
            out[f"{name}_cka_vs_{ref}"] = round(linear_cka(feats, test_feats[ref]), 4)
    out["n_train"], out["n_test"] = len(probe.train_labels), len(probe.test_labels)
    out["seconds"] = round(time.perf_counter() - start, 2)
    torch.set_num_threads(torch_threads)
    return out


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019) between two feature sets of the same images (any widths)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    hsic = (x.T @ y).pow(2).sum()
    return float(hsic / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()))


def random_backbone(backbone_cfg, seed: int = 0, layerscale: float | None = 1.0):
    """The random-init baseline. LayerScale starts at 1.0 (the hub constructors' default) rather than the training
    init (1e-5): with 1e-5 the blocks are near-identity at init, every image gets the same CLS token and k-NN sits
    at chance, which would make a meaninglessly weak baseline."""
    from dataclasses import replace

    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = replace(backbone_cfg, layerscale=layerscale) if backbone_cfg.layerscale else backbone_cfg
        return cfg.build(with_drop_path=False).eval()


__all__ = [
    "FAULT_ENV", "TrainLog", "TrainSpec", "TrainingFailed", "backbone_config", "check_batch", "check_crops",
    "digest", "knn_monitor", "launch_workers", "linear_cka", "loss_config",
    "optim_config", "random_backbone", "run_worker", "sub_state", "write_model_json", "write_training_reports",
]


# ============================================================================================== inputs
def read_shard_index_table(index_url: str, params: Params):
    """The shard index as a table (name, count, bytes), read through the project's storage."""
    import pandas as pd

    from tasks.storage import Storage

    storage = Storage.from_params(params.storage)
    if not storage.exists(index_url):
        raise FileNotFoundError(f"shard index {index_url} not found (run the shards stage or set *.data.shards)")
    raw = storage.read_bytes(index_url)
    index = json.loads(raw)
    frame = pd.DataFrame(index.get("shards", []), columns=["name", "count", "bytes", "sha256"])
    return frame, hashlib.sha256(raw).hexdigest()


def shard_index_checks(frame, global_batch_size: int):
    """GX suite of what a training stage receives: well-formed shard names, non-empty shards, enough images."""
    import great_expectations.expectations as gxe

    from tasks.quality import TableCheck

    return [TableCheck("shard_index", frame, [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToMatchRegex(column="name", regex=r"^shard-\d{6}\.tar$"),
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1),
        gxe.ExpectColumnSumToBeBetween(column="count", min_value=global_batch_size),
    ])]


def export_ssl(full: dict[str, Any], export_dir: Path, step: int, backbone_cfg, loss_cfg, crops: CropsParams,
               optim_cfg, stage: str) -> dict[str, Any]:
    """Pre-training / adaptation exports: the teacher backbone in the official format, and a full checkpoint
    (student + teacher with heads, loss centres, configs) for continued training."""
    from dinov2_core.train.checkpoint import atomic_save

    export_dir.mkdir(parents=True, exist_ok=True)
    teacher, student = sub_state(full, "teacher."), sub_state(full, "student.")
    backbone = sub_state(teacher, "backbone.")
    atomic_save(backbone, export_dir / "teacher_backbone.pth")
    config = {"stage": stage, "step": int(step), "backbone": backbone_cfg.as_dict(), "loss": loss_cfg.as_dict(),
              "crops": crops.model_dump(mode="json"), "optim": optim_cfg.as_dict()}
    atomic_save({"teacher": teacher, "student": student, "dino_loss_center": full["dino_loss.center"],
                 "ibot_patch_loss_center": full["ibot_patch_loss.center"], "config": config},
                export_dir / "full.pth")
    n_params = int(sum(v.numel() for v in backbone.values()))
    write_model_json(export_dir, backbone_cfg,
                     {"teacher_backbone.pth": export_dir / "teacher_backbone.pth", "full.pth": export_dir / "full.pth"},
                     {"stage": stage, "step": int(step), "backbone_parameters": n_params})
    return {"step": int(step), "backbone_parameters": n_params,
            "exports": {"teacher_backbone": str(export_dir / "teacher_backbone.pth"),
                        "full": str(export_dir / "full.pth"), "model_json": str(export_dir / "model.json")}}
