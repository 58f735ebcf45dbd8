"""Seeded, structure-aware weights for parity tests.

Two models with the same state-dict keys and shapes (ours and the reference) get bit-identical weights, so golden
outputs can be regenerated from a seed instead of being stored. Scales are chosen so every part of the network
matters numerically (e.g. a large positional table, so interpolation mistakes show up in the outputs).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn


def _key_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def deterministic_tensor(name: str, shape: torch.Size, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(_key_seed(seed, name))
    z = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "gamma":  # LayerScale: keep residual branches O(1) but not identical
        return 0.5 + 0.25 * z.tanh()
    if leaf == "weight_g":
        return 1.0 + 0.1 * z
    if "norm" in name and leaf == "weight":
        return 1.0 + 0.1 * z
    if leaf == "bias" or "norm" in name:
        return 0.05 * z
    if leaf in ("pos_embed",):
        return 0.5 * z
    if leaf in ("cls_token", "register_tokens", "mask_token"):
        return 0.5 * z
    if leaf in ("running_mean",):
        return 0.1 * z
    if leaf in ("running_var",):
        return 1.0 + 0.1 * z.abs()
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return z / math.sqrt(fan_in)
    return 0.1 * z


def deterministic_state_dict(model: nn.Module | Mapping[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    """A state dict for ``model`` (module or state dict; meta tensors are fine) that depends only on key names,
    shapes and ``seed``. Integer buffers (e.g. BatchNorm counters) are zeroed."""
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    out: dict[str, Tensor] = {}
    for name in sorted(sd):
        t = sd[name]
        if not t.is_floating_point():
            out[name] = torch.zeros(tuple(t.shape), dtype=t.dtype)
        else:
            out[name] = deterministic_tensor(name, t.shape, seed)
    return out


__all__ = ["deterministic_state_dict", "deterministic_tensor"]
