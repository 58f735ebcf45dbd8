"""Optimizer parameter groups with layer-wise lr decay (DINOv2 App. B; rules of the reference implementation).

Per parameter:
* lr_multiplier = layerwise_decay ** (n_blocks + 1 - layer_id), layer_id 0 for the patch embedding and the tokens
  (pos_embed, cls/register/mask tokens), i+1 for block i, n_blocks+1 for everything after the blocks (final norm,
  heads); times ``patch_embed_lr_mult`` (0.2) for the patch embedding.
* wd_multiplier = 0 for biases, normalisation parameters and LayerScale gammas, else 1. The reference code does
  *not* exempt pos_embed / cls / register / mask tokens; ``no_wd_on_tokens=True`` exempts them too.
* is_last_layer for the heads' prototype layer (``last_layer``), whose lr is frozen early in training.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

logger = logging.getLogger(__name__)

_EMBED_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def _layer_id(name: str, num_layers: int, is_backbone: bool, chunked_blocks: bool) -> int:
    if not is_backbone:
        return num_layers + 1
    if any(e in name for e in _EMBED_NAMES):
        return 0
    parts = name.split(".")
    if "blocks" in parts and "residual" not in parts:
        i = parts.index("blocks")
        # chunked layout: blocks.<chunk>.<global index>.*; flat: blocks.<index>.*
        return int(parts[i + 2 if chunked_blocks else i + 1]) + 1
    return num_layers + 1


def get_vit_lr_decay_rate(
    name: str,
    lr_decay_rate: float = 1.0,
    num_layers: int = 12,
    force_is_backbone: bool = False,
    chunked_blocks: bool = False,
) -> float:
    is_backbone = name.startswith("backbone") or force_is_backbone
    return lr_decay_rate ** (num_layers + 1 - _layer_id(name, num_layers, is_backbone, chunked_blocks))


def get_params_groups_with_decay(
    model: nn.Module,
    lr_decay_rate: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    no_wd_on_tokens: bool = False,
) -> list[dict[str, Any]]:
    """One dict per trainable parameter: params, name, lr_multiplier, wd_multiplier, is_last_layer."""
    chunked = False
    if hasattr(model, "n_blocks"):
        n_blocks, chunked = model.n_blocks, bool(getattr(model, "chunked_blocks", False))
    elif hasattr(model, "blocks"):
        n_blocks = len(model.blocks)
    elif hasattr(model, "backbone"):
        n_blocks = getattr(model.backbone, "n_blocks", None) or len(model.backbone.blocks)
        chunked = bool(getattr(model.backbone, "chunked_blocks", False))
    else:
        n_blocks = 0
    groups = []
    for name, param in model.named_parameters():
        name = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        if not param.requires_grad:
            continue
        d = {
            "params": param,
            "name": name,
            "is_last_layer": "last_layer" in name,
            "lr_multiplier": get_vit_lr_decay_rate(
                name,
                lr_decay_rate,
                num_layers=n_blocks,
                force_is_backbone=n_blocks > 0,
                chunked_blocks=chunked,
            ),
            "wd_multiplier": 1.0,
        }
        if name.endswith(".bias") or "norm" in name or "gamma" in name:
            d["wd_multiplier"] = 0.0
        if no_wd_on_tokens and name.split(".")[-1] in (
            "pos_embed",
            "cls_token",
            "register_tokens",
            "mask_token",
        ):
            d["wd_multiplier"] = 0.0
        if "patch_embed" in name:
            d["lr_multiplier"] *= patch_embed_lr_mult
        groups.append(d)
        logger.debug("%s: lr_multiplier %s wd_multiplier %s", name, d["lr_multiplier"], d["wd_multiplier"])
    return groups


def fuse_params_groups(
    all_params_groups: Iterable[dict[str, Any]],
    keys: Sequence[str] = ("lr_multiplier", "wd_multiplier", "is_last_layer"),
) -> list[dict[str, Any]]:
    """Merge per-parameter dicts with equal multipliers into one optimizer group each (fewer groups, foreach-
    friendly)."""
    fused: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"params": []})
    for d in all_params_groups:
        ident = tuple(d[k] for k in keys)
        g = fused[ident]
        for k in keys:
            g[k] = d[k]
        g["params"].append(d["params"])
    return list(fused.values())


__all__ = ["fuse_params_groups", "get_params_groups_with_decay", "get_vit_lr_decay_rate"]
