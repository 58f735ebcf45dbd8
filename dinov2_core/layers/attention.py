"""Multi-head self-attention with an explicitly selected kernel ("backend").

Backends (set per module via ``Attention.backend`` or for a whole model via ``DinoVisionTransformer.attn_backend``):

* ``"sdpa"``        -- ``torch.nn.functional.scaled_dot_product_attention``. For packed streams it runs one SDPA
                       call per group of equal-length sequences (the fast CPU path).
* ``"packed_sdpa"`` -- like ``"sdpa"`` on dense input; on a packed stream one SDPA call over the whole stream with
                       a boolean block-diagonal mask (exact, but O(T^2) mask; kept for testing and benchmarking).
* ``"eager"``       -- softmax(QK^T/sqrt(d))V written out; the reference the others are tested against.
* ``"xformers"``    -- ``xformers.ops.memory_efficient_attention`` (packed: ``BlockDiagonalMask``). CUDA only.
* ``"auto"``        -- ``"xformers"`` when it is importable and the input is on CUDA, else ``"sdpa"``.

xformers is imported lazily, only when a CUDA tensor asks for it; setting ``XFORMERS_DISABLED`` turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .packing import PackedSequences

ATTENTION_BACKENDS = ("auto", "sdpa", "packed_sdpa", "eager", "xformers")


@functools.cache
def _xformers_ops() -> Any:
    if os.environ.get("XFORMERS_DISABLED") is not None:
        return None
    try:
        import xformers.ops as xops
    except Exception:  # ImportError, or a broken CUDA build: either way, no xformers
        return None
    return xops


@torch.compiler.assume_constant_result  # compiled blocks ask it on CUDA: a constant, not a cached call to trace
def xformers_available() -> bool:
    """True when ``xformers.ops`` can be imported (it is still only used for CUDA tensors)."""
    return _xformers_ops() is not None


def resolve_attention_backend(backend: str, device: torch.device) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")
    usable_xformers = device.type == "cuda" and xformers_available()
    if backend == "auto":
        return "xformers" if usable_xformers else "sdpa"
    if backend == "xformers" and not usable_xformers:
        raise RuntimeError("attention backend 'xformers' needs the xformers package and CUDA tensors")
    return backend


def eager_attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Reference attention on (..., N, d) tensors; boolean masks are True where attention is allowed."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    attn = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


class Attention(nn.Module):
    """qkv projection -> attention -> output projection, parameter names as in the released checkpoints."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = float(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}")
        self.backend = backend

    # -- kernels on dense (B, N, 3, H, d) qkv -----------------------------------------------------------------
    def _dense(self, qkv: Tensor, backend: str, attn_mask: Tensor | None, is_causal: bool = False) -> Tensor:
        b, n, _, h, d = qkv.shape
        p = self.attn_drop if self.training else 0.0
        if is_causal:
            if attn_mask is not None:
                raise ValueError("is_causal and an explicit mask are exclusive")
            if backend not in ("sdpa", "packed_sdpa"):  # eager reference / xformers: spell the mask out
                attn_mask = torch.ones(n, n, dtype=torch.bool, device=qkv.device).tril()
                backend = "eager"
        if backend == "xformers":
            xops = _xformers_ops()
            q, k, v = qkv.unbind(2)  # (B, N, H, d), the layout xformers wants
            out = xops.memory_efficient_attention(q, k, v, attn_bias=attn_mask, p=p)
            return out.reshape(b, n, h * d)
        # (B, H, N, d) views; unbinding dim 2 first makes the backward stack the three grads straight into qkv's
        # (B, N, 3, H, d) layout (a permute of the stacked qkv would cost one more copy of it per block)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        if backend == "eager":
            out = eager_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal
            )
        return out.transpose(1, 2).reshape(b, n, h * d)

    def _packed(self, qkv: Tensor, backend: str, packed: PackedSequences) -> Tensor:
        """qkv: (1, T, 3, H, d) packed stream -> (1, T, C)."""
        h, d = qkv.shape[-2:]
        if backend == "xformers":
            return self._dense(qkv, "xformers", packed.xformers_bias())
        if backend == "packed_sdpa":
            return self._dense(qkv, "sdpa", packed.block_diagonal_mask(qkv.device))
        # per-group loop: each group is a regular batch of equal-length sequences
        outs = []
        for i, (gb, gn) in enumerate(packed.groups):
            chunk = qkv[0, packed.offsets[i] : packed.offsets[i + 1]].reshape(gb, gn, 3, h, d)
            outs.append(self._dense(chunk, backend, None).reshape(gb * gn, h * d))
        return torch.cat(outs, dim=0).unsqueeze(0)

    def forward(
        self,
        x: Tensor,
        attn_bias: Any = None,
        packed: PackedSequences | None = None,
        *,
        is_causal: bool = False,
    ) -> Tensor:
        """x: (B, N, C), or (1, T, C) with ``packed`` describing the stream.

        ``attn_bias`` may be a tensor mask (added / boolean, SDPA semantics) or an xformers attention bias (official
        ``MemEffAttention`` calling convention; forces the xformers kernel). ``is_causal`` as in the reference
        ``Attention`` (text tower use); not combinable with packing.
        """
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        if attn_bias is not None and not isinstance(attn_bias, Tensor):
            backend = resolve_attention_backend("xformers", x.device)
        else:
            backend = resolve_attention_backend(self.backend, x.device)
        if packed is not None:
            if is_causal:
                raise ValueError("is_causal is not supported on packed streams")
            out = self._packed(qkv, backend, packed)
        else:
            out = self._dense(qkv, backend, attn_bias, is_causal=is_causal)
        return self.proj_drop(self.proj(out))


class MemEffAttention(Attention):
    """Name kept for drop-in compatibility with the official layers; the kernel is chosen by ``backend``."""
