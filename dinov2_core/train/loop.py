"""The training loop shared by pre-training, high-resolution adaptation and distillation.

Per iteration (official order): apply the lr / wd / last-layer-lr schedules, forward + backward, average the losses
over ranks, stop on a non-finite loss *before* the optimizer step (so the weights and the last checkpoint stay
good), clip each student sub-network's gradient norm, AdamW step, EMA update of the teacher, record, checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import OptimConfig
from .diagnostics import DIAGNOSTIC_KEYS
from .fsdp import all_reduce_mean
from .schedules import Schedules, apply_optim_scheduler, build_schedulers, scale_lr
from .ssl_meta_arch import batch_to_device


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm became NaN/inf; the run stopped before updating the weights."""


def build_optimizer(meta: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the student's parameter groups (layer-wise lr decay, patch-embed lr multiplier, no wd on
    biases/norms/LayerScale). Build it after FSDP sharding: it must hold the sharded parameters."""
    groups = meta.get_params_groups(optim.layerwise_decay, optim.patch_embed_lr_mult)
    return torch.optim.AdamW(groups, betas=(optim.adamw_beta1, optim.adamw_beta2))


def build_schedules(optim: OptimConfig, global_batch_size: int) -> Schedules:
    """The five per-iteration schedules; the lr is scaled with the sqrt rule w.r.t. a batch of 1024 (App. B)."""
    return build_schedulers(
        epochs=optim.epochs,
        epoch_length=optim.epoch_length,
        lr=scale_lr(optim.base_lr, global_batch_size),
        min_lr=optim.min_lr,
        warmup_epochs=optim.warmup_epochs,
        weight_decay=optim.weight_decay,
        weight_decay_end=optim.weight_decay_end,
        momentum_teacher=optim.momentum_teacher,
        final_momentum_teacher=optim.final_momentum_teacher,
        teacher_temp=optim.teacher_temp,
        warmup_teacher_temp=optim.warmup_teacher_temp,
        warmup_teacher_temp_epochs=min(optim.warmup_teacher_temp_epochs, optim.epochs),
        freeze_last_layer_epochs=optim.freeze_last_layer_epochs,
    )


def _norm_value(norm: Any) -> float:
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def clip_gradients(meta: nn.Module, max_norm: float) -> dict[str, float]:
    """Clip each student sub-network separately (as the official code does); returns the pre-clip norms."""
    norms = {}
    for key, module in meta.trainable_modules().items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            continue
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        norms[key] = _norm_value(norm)
    return norms


@dataclass
class LoopResult:
    last_step: int  # number of completed iterations
    records: int
    seconds: float


def format_losses(losses: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(losses.items()))


def train_loop(
    meta: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedules: Schedules,
    batches: Iterator[dict[str, Any]],
    *,
    start_step: int,
    total_steps: int,
    device: torch.device,
    global_batch_size: int,
    clip_grad: float,
    epoch_length: int,
    checkpoint_every: int = 0,
    save_checkpoint: Callable[[int], Any] | None = None,
    monitor_every: int = 0,
    monitor: Callable[[int], Any] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    loss_hook: Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    show_progress: bool = True,
    progress_kwargs: dict[str, Any] | None = None,
    desc: str = "train",
) -> LoopResult:
    """Run iterations ``start_step .. total_steps - 1``. ``save_checkpoint(n)`` is called (on every rank) after
    ``n`` completed iterations when ``n`` is a multiple of ``checkpoint_every`` and at the end; ``monitor(n)``
    likewise (every rank: it may gather sharded weights) for multiples of ``monitor_every`` and at the end."""
    meta.train()
    kwargs = dict(progress_kwargs or {})
    kwargs["disable"] = not show_progress  # also in logs (non-TTY): a line every `mininterval` with rate and ETA
    bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="it", **kwargs)
    started = time.perf_counter()
    n_records = 0
    it = start_step
    last = time.perf_counter()
    try:
        while it < total_steps:
            batch = next(batches)
            if batch.get("step", it) != it:
                raise RuntimeError(f"data position {batch.get('step')} != iteration {it}")
            data_s = time.perf_counter() - last
            batch = batch_to_device(batch, device)
            sched = schedules.at(it)
            apply_optim_scheduler(optimizer, sched["lr"], sched["wd"], sched["last_layer_lr"])
            optimizer.zero_grad(set_to_none=True)
            hook = (lambda losses, _it=it: loss_hook(_it, losses)) if loss_hook is not None else None
            losses = meta.forward_backward(batch, teacher_temp=sched["teacher_temp"], loss_hook=hook)
            reduced = all_reduce_mean(losses)
            if not all(math.isfinite(v) for v in reduced.values()):
                raise NonFiniteLossError(f"non-finite loss at iteration {it} ({format_losses(reduced)})")
            norms = clip_gradients(meta, clip_grad)
            if not all(math.isfinite(v) for v in norms.values()):
                bad = ", ".join(f"{k}={v}" for k, v in norms.items() if not math.isfinite(v))
                raise NonFiniteLossError(f"non-finite gradient norm at iteration {it} ({bad})")
            optimizer.step()
            meta.update_teacher(sched["momentum"])
            now = time.perf_counter()
            step_s = now - last
            last = now
            record: dict[str, Any] = {"step": it, "epoch": it / epoch_length,
                                      **{(k if k in DIAGNOSTIC_KEYS else f"loss_{k}"): v for k, v in reduced.items()},
                                      **sched, **{f"grad_norm_{k}": v for k, v in norms.items()},
                                      "images_per_s": global_batch_size / step_s if step_s > 0 else float("nan"),
                                      "step_s": step_s, "data_s": data_s}
            if on_record is not None:
                on_record(record)
            n_records += 1
            it += 1
            bar.update(1)
            bar.set_postfix(loss=f"{reduced['total']:.3f}", lr=f"{sched['lr']:.2e}", refresh=False)
            if monitor is not None and (it == total_steps or (monitor_every and it % monitor_every == 0)):
                monitor(it)
                last = time.perf_counter()  # monitoring time is not step time
            if save_checkpoint is not None and (it == total_steps or (checkpoint_every and it % checkpoint_every == 0)):
                save_checkpoint(it)
                last = time.perf_counter()  # checkpoint time is not step time
    finally:
        bar.close()
    return LoopResult(last_step=it, records=n_records, seconds=time.perf_counter() - started)


__all__ = ["LoopResult", "NonFiniteLossError", "build_optimizer", "build_schedules", "clip_gradients",
           "format_losses", "train_loop"]
