"""DINOv2 Vision Transformer (Oquab et al. 2023, arXiv:2304.07193), optionally with registers (Darcet et al. 2023).

Module and parameter names, constructor arguments and the public methods follow the reference implementation, so
released checkpoints load with ``strict=True`` and code written for the reference model runs unchanged. What differs
is inside: the attention kernel is an explicit, per-model choice (:mod:`dinov2_core.layers.attention`), lists of
crops are packed into one token stream that stays packed through all blocks, and xformers is never required.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from ..layers import Block, MemEffAttention, Mlp, PatchEmbed, SwiGLUFFNFused
from ..layers.attention import ATTENTION_BACKENDS, Attention
from ..layers.packing import PackedSequences


class BlockChunk(nn.ModuleList):
    """A group of blocks (an FSDP wrapping unit). Earlier indices hold ``nn.Identity`` placeholders so the global
    block index is preserved in parameter names (``blocks.<chunk>.<global index>.*``)."""

    def forward(self, x: Tensor) -> Tensor:
        for b in self:
            x = b(x)
        return x


def _ffn_factory(ffn_layer: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if callable(ffn_layer):
        return ffn_layer
    if ffn_layer == "mlp":
        return Mlp
    if ffn_layer in ("swiglufused", "swiglu"):
        return SwiGLUFFNFused
    if ffn_layer == "identity":
        return lambda *args, **kwargs: nn.Identity()
    raise NotImplementedError(f"unknown ffn_layer {ffn_layer!r}")


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = Block,
        ffn_layer: str | Callable[..., nn.Module] = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_backend: str = "auto",
        pack_sequences: bool = True,
    ) -> None:
        """Arguments as in the reference implementation, plus:

        attn_backend: attention kernel, one of ``ATTENTION_BACKENDS`` (see :mod:`dinov2_core.layers.attention`).
        pack_sequences: run a list of crop batches as one packed token stream (True) or one batch after another.
        init_values: LayerScale init; None or 0 disables LayerScale (then no ``ls*.gamma`` parameters).
        block_chunks: 0 gives the flat ``blocks.<i>.*`` names of the released checkpoints.
        """
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError("num_register_tokens must be >= 0")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.pack_sequences = pack_sequences

        self.patch_embed = embed_layer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        num_patches = self.patch_embed.num_patches

        # parameter registration order = state_dict order of the reference model
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        if drop_path_uniform:
            dpr = [drop_path_rate] * depth
        else:  # linearly increasing with depth
            dpr = [drop_path_rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [0.0] * depth

        ffn = _ffn_factory(ffn_layer)
        blocks_list = [
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                ffn_layer=ffn,
                init_values=init_values,
            )
            for i in range(depth)
        ]
        if block_chunks > 0:
            self.chunked_blocks = True
            chunksize = depth // block_chunks
            chunks = [
                [nn.Identity()] * i + blocks_list[i : i + chunksize] for i in range(0, depth, chunksize)
            ]
            self.blocks = nn.ModuleList([BlockChunk(c) for c in chunks])
        else:
            self.chunked_blocks = False
            self.blocks = nn.ModuleList(blocks_list)

        self.norm = norm_layer(embed_dim)
        self.head: nn.Module = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        self._attn_backend = "auto"
        self.attn_backend = attn_backend
        self.init_weights()

    # ------------------------------------------------------------------------------------------------ setup
    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def attn_backend(self) -> str:
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, backend: str) -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS}")
        self._attn_backend = backend
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend

    def set_attn_backend(self, backend: str) -> DinoVisionTransformer:
        self.attn_backend = backend
        return self

    def iter_blocks(self) -> Iterator[nn.Module]:
        """The transformer blocks in order, whatever the chunking."""
        for b in self.blocks:
            if isinstance(b, BlockChunk):
                yield from (blk for blk in b if not isinstance(blk, nn.Identity))
            else:
                yield b

    # ------------------------------------------------------------------------------------------------ tokens
    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Positional table for an input of height ``w`` and width ``h`` pixels (reference argument names).

        Released models differ here and both behaviours are reproduced: the original ones resize the table with
        bicubic interpolation driven by a *scale factor* (grid + ``interpolate_offset``) / grid, the register models
        (offset 0) by the target *size* with antialiasing (``interpolate_antialias``).
        """
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        gh, gw = w // self.patch_size, h // self.patch_size
        m = int(math.sqrt(n))
        if m * m != n:
            raise ValueError("the positional table is not square")
        if self.interpolate_offset:
            # historical work-around from DINO v1: scale factor slightly above the ratio so the floor of the output
            # size is the intended grid; kept because released weights were trained with it
            kwargs: dict[str, Any] = {
                "scale_factor": (
                    float(gh + self.interpolate_offset) / m,
                    float(gw + self.interpolate_offset) / m,
                )
            }
        else:
            kwargs = {"size": (gh, gw)}
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        if tuple(patch_pos_embed.shape[-2:]) != (gh, gw):
            raise RuntimeError(f"interpolated grid {tuple(patch_pos_embed.shape[-2:])} != {(gh, gw)}")
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Image -> [CLS, registers..., patches...]; masked patches are replaced by ``mask_token`` (iBOT).

        Registers carry no positional embedding (Darcet et al. 2023).
        """
        _, _, w, h = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def _output_dict(self, x: Tensor, masks: Tensor | None, x_norm: Tensor | None = None) -> dict[str, Any]:
        if x_norm is None:
            x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    # ------------------------------------------------------------------------------------------------ forward
    def forward_features_list(
        self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None] | None = None
    ) -> list[dict[str, Any]]:
        """One output dict per input batch. The batches (e.g. global and local crops) may have different sizes."""
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError("masks_list must have one entry per input tensor")
        if not self.pack_sequences:
            return [self.forward_features(x, m) for x, m in zip(x_list, masks_list)]
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        packed = PackedSequences.from_tensors(tokens)
        stream = packed.pack(tokens)
        for blk in self.iter_blocks():
            stream = blk.forward_packed(stream, packed)
        xs = packed.unpack(stream)
        xs_norm = packed.unpack(self.norm(stream))
        return [self._output_dict(x, m, xn) for x, xn, m in zip(xs, xs_norm, masks_list)]

    def forward_features(
        self,
        x: Tensor | Sequence[Tensor],
        masks: Tensor | Sequence[Tensor | None] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Returns ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D), ``x_norm_patchtokens`` (B, N, D),
        ``x_prenorm`` (B, 1+R+N, D) and ``masks``; a list of dicts for a list of tensors."""
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks)
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.iter_blocks():
            x = blk(x)
        return self._output_dict(x, masks)

    def _get_intermediate_layers(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        x = self.prepare_tokens_with_masks(x)
        blocks = list(self.iter_blocks())
        take = range(len(blocks) - n, len(blocks)) if isinstance(n, int) else list(n)
        outputs = []
        for i, blk in enumerate(blocks):
            x = blk(x)
            if i in take:
                outputs.append(x)
        if len(outputs) != len(take):
            raise ValueError(f"only {len(outputs)} / {len(take)} requested blocks exist")
        return outputs

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Any, ...]:
        """Patch tokens of the last ``n`` blocks (or of the listed block indices), for dense evaluation heads."""
        outputs = self._get_intermediate_layers(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            b, _, w, h = x.shape
            outputs = [
                out.reshape(b, w // self.patch_size, h // self.patch_size, -1)
                .permute(0, 3, 1, 2)
                .contiguous()
                for out in outputs
            ]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def forward(self, *args: Any, is_training: bool = False, **kwargs: Any) -> Any:
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])


def _vit(arch: tuple[int, int, int], patch_size: int, num_register_tokens: int, kwargs: dict[str, Any]):
    """Shared factory body; keyword arguments override the architecture defaults (e.g. ``depth`` for small tests)."""
    embed_dim, depth, num_heads = arch
    args: dict[str, Any] = {
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": 4,
        "num_register_tokens": num_register_tokens,
        "block_fn": partial(Block, attn_class=MemEffAttention),
    }
    args.update(kwargs)
    return DinoVisionTransformer(**args)


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-S: 384-d, 12 blocks, 6 heads (~21M parameters)."""
    return _vit((384, 12, 6), patch_size, num_register_tokens, kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-B: 768-d, 12 blocks, 12 heads (~86M parameters)."""
    return _vit((768, 12, 12), patch_size, num_register_tokens, kwargs)


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-L: 1024-d, 24 blocks, 16 heads (~300M parameters)."""
    return _vit((1024, 24, 16), patch_size, num_register_tokens, kwargs)


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-g as in DINOv2 (paper Sec. 5 / App. B): 1536-d, 40 blocks, 24 heads of 64 dims (~1.1B parameters)."""
    return _vit((1536, 40, 24), patch_size, num_register_tokens, kwargs)


__all__ = ["BlockChunk", "DinoVisionTransformer", "vit_base", "vit_giant2", "vit_large", "vit_small"]
