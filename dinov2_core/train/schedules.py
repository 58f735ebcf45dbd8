"""Per-iteration schedules of a DINOv2 run (paper App. B, Table 16; values of the released configs).

All are :class:`CosineScheduler` tables: ``freeze_iters`` zeros, a linear warm-up from ``start_warmup_value`` to
``base_value`` (both ends included), then a half cosine from ``base_value`` to ``final_value``; indices past the end
return ``final_value``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


class CosineScheduler:
    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError("warmup_iters + freeze_iters exceeds total_iters")
        self.base_value = base_value
        self.final_value = final_value
        self.total_iters = total_iters
        n_cos = total_iters - warmup_iters - freeze_iters
        t = np.arange(n_cos) / max(n_cos, 1)
        cosine = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * t))
        self.schedule = np.concatenate(
            (
                np.zeros(freeze_iters),
                np.linspace(start_warmup_value, base_value, warmup_iters),
                cosine,
            )
        )
        assert len(self.schedule) == total_iters

    def __getitem__(self, it: int) -> float:
        if it >= self.total_iters:
            return float(self.final_value)
        return float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters


def scale_lr(base_lr: float, total_batch_size: int, rule: str = "sqrt_wrt_1024") -> float:
    """Learning rate for a global batch: base_lr is defined for 1024 images and scaled by sqrt(batch / 1024)."""
    if rule != "sqrt_wrt_1024":
        raise NotImplementedError(rule)
    return base_lr * math.sqrt(total_batch_size / 1024.0)


@dataclass
class Schedules:
    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler

    def at(self, it: int) -> dict:
        return {
            "lr": self.lr[it],
            "wd": self.wd[it],
            "momentum": self.momentum[it],
            "teacher_temp": self.teacher_temp[it],
            "last_layer_lr": self.last_layer_lr[it],
        }


def build_schedulers(
    *,
    epochs: int = 100,
    epoch_length: int = 1250,
    lr: float = 0.004,
    min_lr: float = 1.0e-6,
    warmup_epochs: int = 10,
    weight_decay: float = 0.04,
    weight_decay_end: float = 0.4,
    momentum_teacher: float = 0.992,
    final_momentum_teacher: float = 1.0,
    teacher_temp: float = 0.07,
    warmup_teacher_temp: float = 0.04,
    warmup_teacher_temp_epochs: int = 30,
    freeze_last_layer_epochs: int = 1,
) -> Schedules:
    """The five schedules of a run, lengths in iterations = epochs * epoch_length.

    * lr: warm-up from 0 over ``warmup_epochs``, cosine to ``min_lr`` (pass the already batch-scaled lr).
    * wd: cosine 0.04 -> 0.4 (0.2 for the ViT-L/g configs).
    * momentum (teacher EMA): cosine 0.992 -> 1 (0.994 for ViT-L/g; the paper's ViT-g run).
    * teacher_temp: linear 0.04 -> 0.07 over the first 30 epochs, then constant (paper Sec. 5 / App. B).
    * last_layer_lr: the lr schedule with zeros for ``freeze_last_layer_epochs`` (stabilises the prototypes).
    """
    total = epochs * epoch_length
    lr_kw = {
        "base_value": lr,
        "final_value": min_lr,
        "total_iters": total,
        "warmup_iters": warmup_epochs * epoch_length,
        "start_warmup_value": 0.0,
    }
    temp_iters = warmup_teacher_temp_epochs * epoch_length
    last_layer = CosineScheduler(**lr_kw)
    last_layer.schedule[: freeze_last_layer_epochs * epoch_length] = 0.0
    return Schedules(
        lr=CosineScheduler(**lr_kw),
        wd=CosineScheduler(weight_decay, weight_decay_end, total),
        momentum=CosineScheduler(momentum_teacher, final_momentum_teacher, total),
        teacher_temp=CosineScheduler(
            teacher_temp,
            teacher_temp,
            temp_iters,
            warmup_iters=temp_iters,
            start_warmup_value=warmup_teacher_temp,
        ),
        last_layer_lr=last_layer,
    )


def apply_optim_scheduler(optimizer: Any, lr: float, wd: float, last_layer_lr: float) -> None:
    """Write this iteration's lr / wd into each param group, honouring its multipliers and last-layer flag
    (groups from :func:`dinov2_core.train.param_groups.get_params_groups_with_decay`)."""
    groups: Iterable[Mapping] = optimizer.param_groups
    for g in groups:
        g["weight_decay"] = wd * g.get("wd_multiplier", 1.0)
        g["lr"] = (last_layer_lr if g.get("is_last_layer", False) else lr) * g.get("lr_multiplier", 1.0)


__all__ = ["CosineScheduler", "Schedules", "apply_optim_scheduler", "build_schedulers", "scale_lr"]
