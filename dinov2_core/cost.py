"""Parameter counts and FLOPs of DINOv2 ViTs, analytically from a config or measured on the ``meta`` device.

FLOPs are 2 x multiply-accumulates of the matmuls and the patch convolution, attention included (QK^T and AV);
norms, softmax, activations and residual adds are not counted (they are <2% for these models). This is the
convention of ``torch.utils.flop_counter``, so both ways of counting agree exactly. A training step costs about
3x the forward (backward = 2x forward). Nothing here allocates real weights: a ViT-g/14 is checked in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from .layers.swiglu_ffn import swiglu_hidden_features


@dataclass(frozen=True)
class ViTSpec:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    in_chans: int = 3
    img_size: int = 518  # size the positional table was built for (518 for the released models)
    num_register_tokens: int = 0
    ffn_layer: str = "mlp"
    layerscale: bool = True
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    ffn_hidden_features: int | None = None  # exact FFN width; None: derived from mlp_ratio and ffn_layer

    @property
    def is_swiglu(self) -> bool:
        return self.ffn_layer in ("swiglu", "swiglufused")

    @property
    def ffn_hidden(self) -> int:
        if self.ffn_hidden_features is not None:
            return self.ffn_hidden_features
        h = int(self.embed_dim * self.mlp_ratio)
        return swiglu_hidden_features(h) if self.is_swiglu else h

    @classmethod
    def from_arch(cls, arch: str, **overrides: Any) -> ViTSpec:
        if arch not in ARCH_SPECS:
            raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCH_SPECS)}")
        return replace(ARCH_SPECS[arch], **overrides)

    @classmethod
    def from_model(cls, model: nn.Module) -> ViTSpec:
        """Read the spec off a :class:`DinoVisionTransformer` (works on meta-device models)."""
        blk = next(model.iter_blocks())
        mlp = blk.mlp
        if hasattr(mlp, "w12"):
            ffn, hidden = "swiglufused", mlp.w3.in_features
        elif hasattr(mlp, "fc1"):
            ffn, hidden = "mlp", mlp.fc1.out_features
        else:
            raise ValueError("unsupported FFN")
        return cls(
            embed_dim=model.embed_dim,
            depth=model.n_blocks,
            num_heads=model.num_heads,
            ffn_hidden_features=hidden,
            patch_size=model.patch_size,
            in_chans=model.patch_embed.in_chans,
            img_size=model.patch_embed.img_size[0],
            num_register_tokens=model.num_register_tokens,
            ffn_layer=ffn,
            layerscale=not isinstance(blk.ls1, nn.Identity),
            qkv_bias=blk.attn.qkv.bias is not None,
            proj_bias=blk.attn.proj.bias is not None,
            ffn_bias=(mlp.w3.bias if ffn != "mlp" else mlp.fc2.bias) is not None,
        )


# DINOv2 paper Table 2 / App. B architectures, as released (patch 14, pos table for 518 px)
ARCH_SPECS: dict[str, ViTSpec] = {
    "vit_small": ViTSpec(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ViTSpec(embed_dim=768, depth=12, num_heads=12),
    "vit_large": ViTSpec(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": ViTSpec(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}


def _ffn_dims(spec: ViTSpec) -> tuple[str, int]:
    return ("swiglu" if spec.is_swiglu else "mlp"), spec.ffn_hidden


def block_params(spec: ViTSpec) -> int:
    d = spec.embed_dim
    kind, h = _ffn_dims(spec)
    n = 2 * d + 2 * d  # norm1, norm2
    n += 3 * d * d + (3 * d if spec.qkv_bias else 0)
    n += d * d + (d if spec.proj_bias else 0)
    if spec.layerscale:
        n += 2 * d
    if kind == "mlp":
        n += d * h + h * d + ((h + d) if spec.ffn_bias else 0)
    else:
        n += d * 2 * h + h * d + ((2 * h + d) if spec.ffn_bias else 0)
    return n


def count_params(spec_or_model: ViTSpec | nn.Module | str) -> int:
    """Parameters of a spec / arch name (analytic) or a module (counted; meta tensors fine)."""
    if isinstance(spec_or_model, nn.Module):
        return sum(p.numel() for p in spec_or_model.parameters())
    spec = ViTSpec.from_arch(spec_or_model) if isinstance(spec_or_model, str) else spec_or_model
    d, p = spec.embed_dim, spec.patch_size
    grid = spec.img_size // p
    n = d * spec.in_chans * p * p + d  # patch embedding
    n += d + (grid * grid + 1) * d + spec.num_register_tokens * d + d  # cls, pos, registers, mask token
    n += spec.depth * block_params(spec)
    n += 2 * d  # final norm
    return n


def block_flops(spec: ViTSpec, n_tokens: int, batch: int = 1) -> dict[str, int]:
    """Forward FLOPs of one block on ``batch`` sequences of ``n_tokens`` tokens, by component."""
    d = spec.embed_dim
    kind, h = _ffn_dims(spec)
    t = batch * n_tokens
    out = {
        "qkv": 2 * t * d * 3 * d,
        "attn_qk": 2 * batch * n_tokens * n_tokens * d,
        "attn_av": 2 * batch * n_tokens * n_tokens * d,
        "proj": 2 * t * d * d,
        "ffn": 2 * t * d * h * 2 if kind == "mlp" else 2 * t * d * 2 * h + 2 * t * h * d,
    }
    out["total"] = sum(out.values())
    return out


def _hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


def forward_flops(spec: ViTSpec | str, img_size: int | Sequence[int] = 224, batch: int = 1) -> dict[str, int]:
    """Forward FLOPs of the backbone (patch embedding + blocks) for ``batch`` images of ``img_size``."""
    spec = ViTSpec.from_arch(spec) if isinstance(spec, str) else spec
    h, w = _hw(img_size)
    p = spec.patch_size
    n_patches = (h // p) * (w // p)
    n_tokens = 1 + spec.num_register_tokens + n_patches
    patch = 2 * batch * n_patches * spec.embed_dim * spec.in_chans * p * p
    blocks = spec.depth * block_flops(spec, n_tokens, batch)["total"]
    return {"patch_embed": patch, "blocks": blocks, "total": patch + blocks, "tokens_per_image": n_tokens}


def multicrop_forward_flops(
    spec: ViTSpec | str,
    global_size: int = 224,
    local_size: int = 98,
    n_global: int = 2,
    n_local: int = 8,
    batch: int = 1,
) -> int:
    """Student backbone forward FLOPs of one multi-crop step (packing changes no FLOPs)."""
    return (
        forward_flops(spec, global_size, batch * n_global)["total"]
        + forward_flops(spec, local_size, batch * n_local)["total"]
    )


def measure_flops(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    backward: bool = False,
    **forward_kwargs: Any,
) -> int:
    """FLOPs counted by ``torch.utils.flop_counter`` for ``model(inputs)`` (meta model + meta inputs: free).

    ``inputs`` may be a tensor or a list of tensors (multi-crop). With ``backward`` the gradient pass is included.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = (
            model.forward_features(inputs, **forward_kwargs)
            if hasattr(model, "forward_features")
            else model(inputs)
        )
        if backward:
            outs = out if isinstance(out, list) else [out]
            loss = sum(o["x_prenorm"].sum() if isinstance(o, dict) else o.sum() for o in outs)
            loss.backward()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class SavedActivations:
    """Bytes autograd keeps for the backward pass (each storage counted once, parameters excluded).

    ``attention_matrix_bytes`` are the B x heads x N x N probabilities that the plain (math) attention path saves;
    memory-efficient kernels (xformers, flash, PyTorch's fused CPU SDPA) keep only a per-row log-sum-exp instead.
    """

    total_bytes: int
    attention_matrix_bytes: int

    @property
    def memory_efficient_bytes(self) -> int:
        return self.total_bytes - self.attention_matrix_bytes


def count_saved_activations(fn: Callable[[], Any], params: Iterable[torch.Tensor] = ()) -> SavedActivations:
    """Run ``fn()`` (a forward pass with autograd on) and add up what it saves for backward.

    Works on meta tensors, so the activation memory of a paper-scale model is counted without allocating it, the
    same way :func:`measure_flops` counts FLOPs. Tensors sharing a storage (views) count once; the storages of
    ``params`` (weights saved by linear layers) are not activations and are left out.
    """
    param_storages = {p.untyped_storage()._cdata for p in params}
    seen: dict[int, int] = {}
    attention: set[int] = set()
    alive: list[torch.Tensor] = []  # a freed storage's address may be reused: hold every one until the count is done

    def pack(t: torch.Tensor) -> torch.Tensor:
        alive.append(t)
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in param_storages and key not in seen:
            seen[key] = storage.nbytes()
            softmax_out = t.grad_fn is not None and "Softmax" in type(t.grad_fn).__name__
            if softmax_out and t.dim() == 4 and t.shape[-1] == t.shape[-2]:
                attention.add(key)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return SavedActivations(sum(seen.values()), sum(seen[k] for k in attention))


@dataclass
class CostSummary:
    arch: str
    img_size: tuple[int, int]
    batch: int
    params: int
    tokens_per_image: int
    forward_flops: int

    @property
    def forward_gflops(self) -> float:
        return self.forward_flops / 1e9

    @property
    def train_step_gflops(self) -> float:
        return 3 * self.forward_gflops

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(forward_gflops=self.forward_gflops, train_step_gflops=self.train_step_gflops)
        return d

    def __str__(self) -> str:
        h, w = self.img_size
        return (
            f"{self.arch} @ {h}x{w} x{self.batch}: {self.params / 1e6:,.1f} M params, {self.tokens_per_image} tokens/img, "
            f"forward {self.forward_gflops:,.2f} GFLOP, fwd+bwd ~{self.train_step_gflops:,.2f} GFLOP"
        )


def model_cost(
    arch: str | ViTSpec | nn.Module,
    img_size: int | Sequence[int] = 224,
    batch: int = 1,
    **overrides: Any,
) -> CostSummary:
    """Print-friendly cost of an arch name (``vit_small`` ... ``vit_giant2``), a spec or a model."""
    if isinstance(arch, nn.Module):
        spec, name = ViTSpec.from_model(arch), type(arch).__name__
    elif isinstance(arch, str):
        spec, name = ViTSpec.from_arch(arch, **overrides), arch
    else:
        spec, name = arch, "vit"
    f = forward_flops(spec, img_size, batch)
    return CostSummary(
        arch=name,
        img_size=_hw(img_size),
        batch=batch,
        params=count_params(spec),
        tokens_per_image=f["tokens_per_image"],
        forward_flops=f["total"],
    )


__all__ = [
    "ARCH_SPECS",
    "CostSummary",
    "ViTSpec",
    "block_flops",
    "block_params",
    "count_params",
    "forward_flops",
    "measure_flops",
    "model_cost",
    "multicrop_forward_flops",
]
