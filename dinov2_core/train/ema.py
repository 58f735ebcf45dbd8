"""Teacher = exponential moving average of the student (DINOv2 Sec. 3; momentum from the cosine schedule).

Works on plain tensors and on FSDP2-sharded parameters: each rank updates its local shard (``DTensor.to_local()``),
which is correct because teacher and student are sharded the same way. Uses fused ``torch._foreach_*`` kernels.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

try:  # DTensor ships with torch.distributed; absent on builds without distributed support
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment]


def _local(t: Tensor) -> Tensor:
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def _params(x: nn.Module | Iterable[Tensor]) -> list[Tensor]:
    return list(x.parameters()) if isinstance(x, nn.Module) else list(x)


@torch.no_grad()
def ema_update_(
    teacher: nn.Module | Iterable[Tensor], student: nn.Module | Iterable[Tensor], momentum: float
) -> None:
    """In place: teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter.

    Modules are matched by ``parameters()`` order, so teacher and student must have the same structure.
    """
    t_list = [_local(p) for p in _params(teacher)]
    s_list = [_local(p) for p in _params(student)]
    if len(t_list) != len(s_list):
        raise ValueError(f"teacher has {len(t_list)} parameters, student {len(s_list)}")
    for t, s in zip(t_list, s_list):
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch {tuple(t.shape)} vs {tuple(s.shape)}")
    if not t_list:
        return
    s_list = [s.to(dtype=t.dtype) if s.dtype != t.dtype else s for t, s in zip(t_list, s_list)]
    torch._foreach_mul_(t_list, momentum)
    torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)


update_teacher = ema_update_

__all__ = ["ema_update_", "update_teacher"]
