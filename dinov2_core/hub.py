"""Hub-style constructors of the released DINOv2 backbones (same names and defaults as the reference hubconf).

``pretrained=True`` loads weights, from (in order of precedence) ``weights``:
  * ``Weights.LVD142M`` (default): the public checkpoint URL of the model;
  * a local path;
  * any URL (``s3://``, ``gs://``, ``https://`` ...), opened with the ``opener`` callable the caller passes, e.g.
    ``opener=lambda url: fsspec.open(url, "rb")``; https URLs without an opener go through ``torch.hub``'s cache;
  * an already-loaded state dict.
Loading always uses ``torch.load(weights_only=True)`` and ``load_state_dict(strict=True)``. Training checkpoints
(``{"teacher": {"backbone.*": ...}}`` or ``{"model": ...}``) are accepted: the backbone part is extracted.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Union

import torch

from .models import ARCHS, DinoVisionTransformer

_DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"

Opener = Callable[[str], Any]  # url -> context manager yielding a binary file object
WeightsArg = Union["Weights", str, os.PathLike, Mapping[str, torch.Tensor]]


class Weights(Enum):
    LVD142M = "LVD142M"


def _make_dinov2_model_name(arch_name: str, patch_size: int, num_register_tokens: int = 0) -> str:
    compact = arch_name.replace("_", "")[:4]  # vit_small -> vits, vit_giant2 -> vitg
    suffix = f"_reg{num_register_tokens}" if num_register_tokens else ""
    return f"dinov2_{compact}{patch_size}{suffix}"


def checkpoint_url(arch_name: str, patch_size: int = 14, num_register_tokens: int = 0) -> str:
    base = _make_dinov2_model_name(arch_name, patch_size)
    full = _make_dinov2_model_name(arch_name, patch_size, num_register_tokens)
    return f"{_DINOV2_BASE_URL}/{base}/{full}_pretrain.pth"


def _is_url(s: str) -> bool:
    return "://" in s


def load_checkpoint(
    source: str | os.PathLike, opener: Opener | None = None, map_location: Any = "cpu", mmap: bool = False
) -> Any:
    """torch.load(weights_only=True) from a local path or a URL (through ``opener`` if given); ``mmap`` maps a local
    file's tensors instead of reading them (a ViT-g's full checkpoint is GBs), falling back to a plain read for a
    file in torch's legacy format, which cannot be mapped.

    A file that is not a checkpoint (truncated, another format, a pickle with code in it) is a ValueError naming
    it in one line; torch's own message for it runs to a dozen lines about ``weights_only``."""
    source = os.fspath(source)
    if _is_url(source):
        if opener is not None:
            with opener(source) as f:
                data = f.read()
            return _safe_load(io.BytesIO(data), source, map_location)
        if source.startswith(("http://", "https://")):
            return torch.hub.load_state_dict_from_url(source, map_location=map_location, weights_only=True)
        raise ValueError(f"no opener given for {source!r}; pass e.g. opener=lambda u: fsspec.open(u, 'rb')")
    return _safe_load(source, source, map_location, mmap)


def _safe_load(f: Any, source: str, map_location: Any, mmap: bool = False) -> Any:
    try:
        return torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
    # what torch's reader raises on bytes that are no checkpoint (seen on random bytes: the last four too)
    except (pickle.UnpicklingError, EOFError, RuntimeError, IndexError, KeyError, UnicodeDecodeError) as exc:
        if mmap and "mmap can only be used" in str(exc):  # legacy format (or no zip at all): read it whole
            return _safe_load(f, source, map_location)
        text = str(exc).strip()
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)  # past torch's paragraph on weights_only
        why = detail.group(1).strip() if detail else text.split(". ")[0].splitlines()[0] if text else ""
        raise ValueError(f"{source}: not a checkpoint torch.load(weights_only=True) can read "
                         f"({type(exc).__name__}: {why[:160]})") from exc


def extract_backbone_state_dict(checkpoint: Mapping[str, Any], key: str | None = None) -> dict:
    """Backbone weights from a backbone state dict or a training checkpoint.

    Picks ``checkpoint[key]`` (or the first of "teacher", "model", "state_dict" present) when the mapping is not a
    backbone state dict itself, strips ``module.`` / ``backbone.`` / ``_orig_mod.`` prefixes and drops head entries.
    """
    sd: Mapping[str, Any] = checkpoint
    if key is not None:
        sd = checkpoint[key]
    elif "cls_token" not in checkpoint and "backbone.cls_token" not in checkpoint:
        for k in ("teacher", "model", "state_dict"):
            if k in checkpoint and isinstance(checkpoint[k], Mapping):
                sd = checkpoint[k]
                break
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod.", "backbone."):
            k = k.removeprefix(prefix)
        if k.startswith(("dino_head.", "ibot_head.")):
            continue
        out[k] = v
    return out


def _make_dinov2_model(
    *,
    arch_name: str = "vit_large",
    img_size: int = 518,
    patch_size: int = 14,
    init_values: float = 1.0,
    ffn_layer: str = "mlp",
    block_chunks: int = 0,
    num_register_tokens: int = 0,
    interpolate_antialias: bool = False,
    interpolate_offset: float = 0.1,
    pretrained: bool = True,
    weights: WeightsArg = Weights.LVD142M,
    opener: Opener | None = None,
    checkpoint_key: str | None = None,
    **kwargs: Any,
) -> DinoVisionTransformer:
    vit_kwargs = {
        "img_size": img_size,
        "patch_size": patch_size,
        "init_values": init_values,
        "ffn_layer": ffn_layer,
        "block_chunks": block_chunks,
        "num_register_tokens": num_register_tokens,
        "interpolate_antialias": interpolate_antialias,
        "interpolate_offset": interpolate_offset,
    }
    vit_kwargs.update(kwargs)
    model = ARCHS[arch_name](**vit_kwargs)
    if not pretrained:
        return model
    if isinstance(weights, str) and weights in Weights.__members__:
        weights = Weights[weights]
    if isinstance(weights, Weights):
        state = load_checkpoint(checkpoint_url(arch_name, patch_size, num_register_tokens), opener=opener)
    elif isinstance(weights, Mapping):
        state = weights
    else:
        state = load_checkpoint(weights, opener=opener)
    load_strict(model, extract_backbone_state_dict(state, checkpoint_key),
                weights if isinstance(weights, (str, os.PathLike)) else arch_name)
    return model


def load_strict(model: torch.nn.Module, state: Mapping[str, Any], source: str | os.PathLike) -> None:
    """load_state_dict(strict=True), with a mismatch said in one line (how many keys are missing, unexpected or of
    another shape, one example of each): torch lists every key over many lines, so a wrong architecture for a file
    showed as 'Error(s) in loading state_dict for DinoVisionTransformer:' and nothing else on one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if keys]
    if problems:
        raise ValueError(f"{os.fspath(source)}: weights do not fit {type(model).__name__}: " + ", ".join(problems))
    model.load_state_dict(state, strict=True)


_REG = {
    "num_register_tokens": 4,
    "interpolate_antialias": True,
    "interpolate_offset": 0.0,
}  # Darcet et al. 2023 models


def dinov2_vits14(
    *, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs: Any
) -> DinoVisionTransformer:
    """ViT-S/14 (LVD-142M)."""
    return _make_dinov2_model(arch_name="vit_small", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitb14(
    *, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs: Any
) -> DinoVisionTransformer:
    """ViT-B/14 (LVD-142M)."""
    return _make_dinov2_model(arch_name="vit_base", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitl14(
    *, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs: Any
) -> DinoVisionTransformer:
    """ViT-L/14 (LVD-142M)."""
    return _make_dinov2_model(arch_name="vit_large", pretrained=pretrained, weights=weights, **kwargs)


def dinov2_vitg14(
    *, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs: Any
) -> DinoVisionTransformer:
    """ViT-g/14 (LVD-142M), SwiGLU FFN."""
    return _make_dinov2_model(
        arch_name="vit_giant2", ffn_layer="swiglufused", pretrained=pretrained, weights=weights, **kwargs
    )


def dinov2_vits14_reg(
    *, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs: Any
) -> DinoVisionTransformer:
    """ViT-S/14 with 4 registers."""
    return _make_dinov2_model(arch_name="vit_small", pretrained=pretrained, weights=weights, **_REG, **kwargs)


def dinov2_vitb14_reg(
    *, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs: Any
) -> DinoVisionTransformer:
    """ViT-B/14 with 4 registers."""
    return _make_dinov2_model(arch_name="vit_base", pretrained=pretrained, weights=weights, **_REG, **kwargs)


def dinov2_vitl14_reg(
    *, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs: Any
) -> DinoVisionTransformer:
    """ViT-L/14 with 4 registers."""
    return _make_dinov2_model(arch_name="vit_large", pretrained=pretrained, weights=weights, **_REG, **kwargs)


def dinov2_vitg14_reg(
    *, pretrained: bool = True, weights: WeightsArg = Weights.LVD142M, **kwargs: Any
) -> DinoVisionTransformer:
    """ViT-g/14 with 4 registers, SwiGLU FFN."""
    return _make_dinov2_model(
        arch_name="vit_giant2",
        ffn_layer="swiglufused",
        pretrained=pretrained,
        weights=weights,
        **_REG,
        **kwargs,
    )


HUB_MODELS = {
    f.__name__: f
    for f in (
        dinov2_vits14,
        dinov2_vitb14,
        dinov2_vitl14,
        dinov2_vitg14,
        dinov2_vits14_reg,
        dinov2_vitb14_reg,
        dinov2_vitl14_reg,
        dinov2_vitg14_reg,
    )
}

def load_export(model_json: str | os.PathLike, name: str = "teacher_backbone.pth") -> DinoVisionTransformer:
    """A backbone exported by the training stages: its ``model.json`` names the hub constructor, its kwargs (depth,
    width, image size... of a model smaller than the released ones) and the weight files; strict load, eval mode."""

    info = json.loads(Path(model_json).read_text())
    constructor = info["hub"]["constructor"].rsplit(".", 1)[-1]
    if constructor not in HUB_MODELS:
        raise ValueError(f"{model_json}: unknown hub constructor '{constructor}'")
    files = info["files"]
    if name not in files:
        raise ValueError(f"{model_json}: no '{name}' (exported: {sorted(files)})")
    weights = Path(model_json).parent / files[name]["path"]
    return HUB_MODELS[constructor](pretrained=True, weights=str(weights), **info["hub"]["kwargs"]).eval()


__all__ = [
    "HUB_MODELS",
    "Weights",
    "checkpoint_url",
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "dinov2_vitg14",
    "dinov2_vitg14_reg",
    "dinov2_vitl14",
    "dinov2_vitl14_reg",
    "dinov2_vits14",
    "dinov2_vits14_reg",
    "extract_backbone_state_dict",
    "load_checkpoint",
    "load_export",
]
