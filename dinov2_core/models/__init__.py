"""Backbones: the DINOv2 Vision Transformer and its factories."""

from __future__ import annotations

from typing import Any

from ..config import BackboneConfig
from .deterministic import deterministic_state_dict
from .vision_transformer import BlockChunk, DinoVisionTransformer, vit_base, vit_giant2, vit_large, vit_small

ARCHS = {"vit_small": vit_small, "vit_base": vit_base, "vit_large": vit_large, "vit_giant2": vit_giant2}


def build_backbone(cfg: BackboneConfig, with_drop_path: bool = True) -> DinoVisionTransformer:
    """The backbone a :class:`~dinov2_core.config.BackboneConfig` describes (stochastic depth only for a student)."""
    return ARCHS[cfg.arch](**cfg.model_kwargs(with_drop_path))


def build_model(args: Any, only_teacher: bool = False, img_size: int = 224) -> tuple:
    """Student and teacher backbones from a config section with the official field names (``arch``,
    ``patch_size``, ``layerscale``, ``ffn_layer``, ``block_chunks``, ``qkv_bias``, ``proj_bias``, ``ffn_bias``,
    ``num_register_tokens``, ``interpolate_offset``, ``interpolate_antialias``, ``drop_path_rate``,
    ``drop_path_uniform``). Returns ``(student, teacher, embed_dim)`` or ``(teacher, embed_dim)``."""
    arch = str(args.arch).removesuffix("_memeff")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    vit_kwargs = {
        "img_size": img_size,
        "patch_size": args.patch_size,
        "init_values": args.layerscale,
        "ffn_layer": args.ffn_layer,
        "block_chunks": args.block_chunks,
        "qkv_bias": args.qkv_bias,
        "proj_bias": args.proj_bias,
        "ffn_bias": args.ffn_bias,
        "num_register_tokens": args.num_register_tokens,
        "interpolate_offset": args.interpolate_offset,
        "interpolate_antialias": args.interpolate_antialias,
    }
    teacher = ARCHS[arch](**vit_kwargs)
    if only_teacher:
        return teacher, teacher.embed_dim
    student = ARCHS[arch](
        **vit_kwargs, drop_path_rate=args.drop_path_rate, drop_path_uniform=args.drop_path_uniform
    )
    return student, teacher, student.embed_dim


def build_model_from_cfg(cfg: Any, only_teacher: bool = False) -> tuple:
    """``build_model(cfg.student, img_size=cfg.crops.global_crops_size)`` as in the official code."""
    return build_model(cfg.student, only_teacher=only_teacher, img_size=cfg.crops.global_crops_size)


__all__ = [
    "ARCHS",
    "BlockChunk",
    "DinoVisionTransformer",
    "build_backbone",
    "build_model",
    "build_model_from_cfg",
    "deterministic_state_dict",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
]
