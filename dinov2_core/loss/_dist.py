"""torch.distributed helpers that degrade to single-process no-ops when no process group is initialised."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_reduce_(t: torch.Tensor, async_op: bool = False, op: Any = None) -> Any | None:
    """In-place sum (or ``op``) over ranks; identity with one rank (a gloo collective on one rank changes nothing
    and costs OpenMP its spinning threads: see ``dinov2_core.train.checkpoint._distributed``). Returns the handle
    if ``async_op``."""
    if world_size() > 1:
        return dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM, async_op=async_op)
    return None


@torch.no_grad()
def sinkhorn_knopp(
    scores: torch.Tensor, temp: float, n_iterations: int = 3, n_samples: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Sinkhorn-Knopp centering (SwAV; DINOv2 Sec. 3 "Sinkhorn-Knopp centering") over all ranks.

    ``scores`` (B_local, K) -> assignments (B_local, K) whose rows sum to 1 and whose prototype marginals are
    pushed towards uniform. ``n_samples`` is the *global* number of samples; by default B_local * world size (iBOT
    passes the all-reduced count of masked patches since ranks hold different numbers).
    """
    scores = scores.float()
    # Subtracting the global max changes nothing after the first normalisation but keeps exp() finite for sharp
    # teachers (logits / 0.04 overflow float32 beyond ~3.5); the reference code has no such guard.
    # A rank without samples (no masked patch this step) still joins every collective; its max is -inf.
    shift = scores.max().detach().clone() if scores.numel() else scores.new_full((), float("-inf"))
    all_reduce_(shift, op=dist.ReduceOp.MAX)
    q = torch.exp((scores - shift) / temp).t()  # (K, B) as in the paper's notation
    k = q.shape[0]
    if n_samples is None:
        b: torch.Tensor | float = float(q.shape[1] * world_size())
    else:
        b = n_samples
    total = q.sum()
    all_reduce_(total)
    q /= total
    for _ in range(n_iterations):
        rows = q.sum(dim=1, keepdim=True)  # mass of each prototype, over all ranks
        all_reduce_(rows)
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample's column is local
        q /= b
    q *= b
    return q.t()
