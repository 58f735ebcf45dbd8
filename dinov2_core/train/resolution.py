"""Changing a trained model's input resolution (paper Sec. 4, "Adaptive resolution"): the new model keeps a
``pos_embed`` parameter, set to exactly the table the old model would have interpolated for the new size (its own
``interpolate_pos_encoding``: bicubic, same offset / antialias settings), so at the switch it computes the same
function as the old one at the new resolution."""

from __future__ import annotations

from typing import Any

import torch

from ..models import build_backbone


def interpolate_pos_embed(backbone_state: dict[str, Any], old_cfg, new_size: int) -> dict[str, Any]:
    """``backbone_state`` with ``pos_embed`` resized for ``new_size`` px by the old model's own interpolation."""
    with torch.device("meta"):
        old = build_backbone(old_cfg, with_drop_path=False)
    old.pos_embed = torch.nn.Parameter(backbone_state["pos_embed"].detach().clone(), requires_grad=False)
    grid = new_size // old_cfg.patch_size
    dummy = torch.zeros(1, 1 + grid * grid, old.embed_dim)
    with torch.no_grad():
        table = old.interpolate_pos_encoding(dummy, new_size, new_size)
    out = dict(backbone_state)
    out["pos_embed"] = table.detach().clone().contiguous()
    return out


def adapted_state(module_state: dict[str, Any], old_cfg, new_size: int) -> dict[str, Any]:
    """A student/teacher state (``backbone.*`` + heads) with the backbone's positional table resized."""
    backbone = {k[len("backbone."):]: v for k, v in module_state.items() if k.startswith("backbone.")}
    backbone = interpolate_pos_embed(backbone, old_cfg, new_size)
    out = {k: v for k, v in module_state.items() if not k.startswith("backbone.")}
    out.update({f"backbone.{k}": v for k, v in backbone.items()})
    return out


__all__ = ["adapted_state", "interpolate_pos_embed"]
