"""Training-side pieces that need no trainer: schedules, teacher EMA, optimizer parameter groups."""

from .ema import ema_update_, update_teacher
from .param_groups import fuse_params_groups, get_params_groups_with_decay, get_vit_lr_decay_rate
from .schedules import CosineScheduler, Schedules, apply_optim_scheduler, build_schedulers, scale_lr

__all__ = [
    "CosineScheduler",
    "Schedules",
    "apply_optim_scheduler",
    "build_schedulers",
    "ema_update_",
    "fuse_params_groups",
    "get_params_groups_with_decay",
    "get_vit_lr_decay_rate",
    "scale_lr",
    "update_teacher",
]
