"""Transformer building blocks with the official DINOv2 module and parameter names."""

from ..heads import DINOHead
from .attention import ATTENTION_BACKENDS, Attention, MemEffAttention, eager_attention, xformers_available
from .block import Block, NestedTensorBlock, checkpoint_blocks, compile_blocks
from .drop_path import DropPath, drop_add_residual_stochastic_depth, drop_path
from .layer_scale import LayerScale
from .mlp import Mlp
from .packing import PackedSequences
from .patch_embed import PatchEmbed
from .swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused, swiglu_hidden_features

__all__ = [
    "ATTENTION_BACKENDS",
    "Attention",
    "Block",
    "DINOHead",
    "DropPath",
    "LayerScale",
    "MemEffAttention",
    "Mlp",
    "NestedTensorBlock",
    "PackedSequences",
    "PatchEmbed",
    "SwiGLUFFN",
    "SwiGLUFFNFused",
    "checkpoint_blocks",
    "compile_blocks",
    "drop_add_residual_stochastic_depth",
    "drop_path",
    "eager_attention",
    "swiglu_hidden_features",
    "xformers_available",
]
