"""Pre-norm transformer block with LayerScale and (efficient) stochastic depth.

Accepts a dense (B, N, D) batch, a list of batches (packed internally), or a packed (1, T, D) stream through
:meth:`Block.forward_packed` (what the ViT uses so the stream stays packed across all blocks).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .drop_path import DropPath, drop_add_residual_stochastic_depth, kept_subset_size
from .layer_scale import LayerScale
from .mlp import Mlp
from .packing import PackedSequences

# DINOv2 (Sec. 5) skips the dropped samples' compute; below this rate the gather/scatter overhead is not worth it
# and the classic per-sample mask is used (same threshold as the reference implementation).
EFFICIENT_DROP_PATH_MIN_RATE = 0.1


class _ScaledResidual(torch.autograd.Function):
    """x + y * gamma in one pass (``torch.addcmul``), with the backward written out: autograd's own addcmul
    backward multiplies by its scalar ``value`` as well, one more pass over the activations than it saves."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, gamma: Tensor) -> Tensor:
        ctx.save_for_backward(y, gamma)
        return torch.addcmul(x, y, gamma)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        y, gamma = ctx.saved_tensors
        grad_y = grad * gamma if ctx.needs_input_grad[1] else None
        grad_gamma = (grad * y).reshape(-1, gamma.shape[0]).sum(0) if ctx.needs_input_grad[2] else None
        return grad, grad_y, grad_gamma


def _add_scaled(x: Tensor, y: Tensor, ls: nn.Module) -> Tensor:
    """x + ls(y); LayerScale folds into the residual add (one activation-sized pass and tensor fewer per branch)."""
    if isinstance(ls, LayerScale) and not ls.inplace and x.dtype == y.dtype == ls.gamma.dtype:
        return _ScaledResidual.apply(x, y, ls.gamma)
    return x + ls(y)


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., nn.Module] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            drop=drop,
            bias=ffn_bias,
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path

    # residual branches ----------------------------------------------------------------------------------------
    def _attn(self, x: Tensor, packed: PackedSequences | None = None) -> Tensor:
        if packed is None:
            return self.attn(self.norm1(x))
        return self.attn(self.norm1(x), packed=packed)

    def _ffn(self, x: Tensor, packed: PackedSequences | None = None) -> Tensor:
        return self.mlp(self.norm2(x))

    def _attn_branch(self, x: Tensor, packed: PackedSequences | None = None) -> Tensor:
        return self.ls1(self._attn(x, packed))

    def _ffn_branch(self, x: Tensor, packed: PackedSequences | None = None) -> Tensor:
        return self.ls2(self._ffn(x, packed))

    def _residuals(self, x: Tensor, packed: PackedSequences | None = None) -> Tensor:
        """Both residual branches without stochastic depth: x + ls1(attn) then + ls2(ffn)."""
        x = _add_scaled(x, self._attn(x, packed), self.ls1)
        return _add_scaled(x, self._ffn(x, packed), self.ls2)

    # dense ----------------------------------------------------------------------------------------------------
    def forward_dense(self, x: Tensor) -> Tensor:
        rate = self.sample_drop_ratio
        if self.training and rate > EFFICIENT_DROP_PATH_MIN_RATE:
            x = drop_add_residual_stochastic_depth(x, self._attn_branch, rate)
            x = drop_add_residual_stochastic_depth(x, self._ffn_branch, rate)
        elif self.training and rate > 0.0:
            x = x + self.drop_path1(self._attn_branch(x))
            x = x + self.drop_path2(self._ffn_branch(x))
        else:
            x = self._residuals(x)
        return x

    # packed ---------------------------------------------------------------------------------------------------
    def _packed_residual(self, x: Tensor, packed: PackedSequences, branch: Callable) -> Tensor:
        rate = self.sample_drop_ratio
        if rate > EFFICIENT_DROP_PATH_MIN_RATE:
            # gather the kept samples of every group, run the branch on them only, scatter back rescaled
            keep, scales = [], []
            for b, n in packed.groups:
                k = kept_subset_size(b, rate)
                keep.append(torch.randperm(b)[:k])
                scales.append(torch.full((k * n,), b / k))
            rows, sub = packed.row_index(keep)
            rows = rows.to(x.device)
            residual = branch(x[:, rows], sub)
            scale = torch.cat(scales).to(device=x.device, dtype=residual.dtype)
            return x.index_add(1, rows, (residual * scale[None, :, None]).to(x.dtype))
        keep_prob = 1.0 - rate
        per_sample = [torch.empty(b).bernoulli_(keep_prob) / keep_prob for b, _ in packed.groups]
        per_token = torch.cat([s.repeat_interleave(n) for s, (_, n) in zip(per_sample, packed.groups)]).to(
            device=x.device, dtype=x.dtype
        )
        return x + branch(x, packed) * per_token[None, :, None]

    def forward_packed(self, x: Tensor, packed: PackedSequences) -> Tensor:
        """x: (1, T, D) stream laid out as ``packed``; attention never crosses sequence boundaries."""
        if not self.training or self.sample_drop_ratio <= 0.0:
            return self._residuals(x, packed)
        x = self._packed_residual(x, packed, self._attn_branch)
        return self._packed_residual(x, packed, self._ffn_branch)

    def forward_nested(self, x_list: Sequence[Tensor]) -> list[Tensor]:
        packed = PackedSequences.from_tensors(x_list)
        return packed.unpack(self.forward_packed(packed.pack(x_list), packed))

    def forward(self, x_or_x_list: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        if isinstance(x_or_x_list, Tensor):
            return self.forward_dense(x_or_x_list)
        if isinstance(x_or_x_list, (list, tuple)):
            return self.forward_nested(x_or_x_list)
        raise TypeError(f"expected a tensor or a list of tensors, got {type(x_or_x_list).__name__}")


# Official name: the reference implementation's block that also accepts lists of tensors.
NestedTensorBlock = Block


def compile_blocks(root: nn.Module, **compile_kwargs) -> int:
    """``torch.compile`` the residual computation of every :class:`Block` under ``root`` (regional compilation:
    the blocks share one graph, so the compile cost is that of one block, not of the depth).

    The compiled functions replace ``forward_dense`` / ``forward_packed`` on each instance, below the module's
    ``forward`` and below FSDP's hooks, so sharding (before or after) and checkpoints are unaffected. Returns the
    number of blocks compiled. Bound as methods, so a deep copy of the model runs its own weights."""
    dense = torch.compile(Block.forward_dense, **compile_kwargs)
    packed = torch.compile(Block.forward_packed, **compile_kwargs)
    n = 0
    for module in root.modules():
        if isinstance(module, Block):
            module.forward_dense = types.MethodType(dense, module)
            module.forward_packed = types.MethodType(packed, module)
            n += 1
    return n


def _recomputed(fn: Callable) -> Callable:
    """``fn(self, ...)`` that keeps only its inputs for backward and runs again there (non-reentrant checkpoint: the
    RNG state is replayed, so stochastic depth drops the same samples). Without autograd it just runs."""

    def run(self: Block, *args):
        if not torch.is_grad_enabled():
            return fn(self, *args)
        return checkpoint(fn, self, *args, use_reentrant=False)

    return run


def checkpoint_blocks(root: nn.Module) -> int:
    """Activation checkpointing of every :class:`Block` under ``root``: a block keeps its input for backward instead
    of its attention and MLP activations, and recomputes them there (memory for one more forward: what lets a
    ViT-g or a larger batch fit on a GPU). Wraps whatever ``forward_dense`` / ``forward_packed`` the block has, so
    call it after :func:`compile_blocks` to checkpoint the compiled blocks; bound as methods like those, so a deep
    copy keeps its own weights. Returns the number of blocks wrapped."""
    n = 0
    for module in root.modules():
        if isinstance(module, Block):
            for name in ("forward_dense", "forward_packed"):
                setattr(module, name, types.MethodType(_recomputed(getattr(module, name).__func__), module))
            n += 1
    return n
