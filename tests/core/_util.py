"""Shared helpers of the core tests (tiny models, golden fixtures)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from dinov2_core.models import DinoVisionTransformer, deterministic_state_dict

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
OFFICIAL_COMMIT = "b8931f7bf91576930313be2c6d6af376033b35f0"
ATOL = 1e-4


def tiny_vit(num_register_tokens: int = 0, seed: int = 0, **kw) -> DinoVisionTransformer:
    """A 2-block, 32-d ViT with patch 14 and a 4x4 positional table (56 px)."""
    cfg = {
        "img_size": 56,
        "patch_size": 14,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 4,
        "init_values": 1.0,
        "block_chunks": 0,
        "num_register_tokens": num_register_tokens,
    }
    cfg.update(kw)
    m = DinoVisionTransformer(**cfg)
    m.load_state_dict(deterministic_state_dict(m, seed))
    return m.eval()


@cache
def golden(name: str) -> dict:
    return torch.load(GOLDEN_DIR / name, weights_only=True)
