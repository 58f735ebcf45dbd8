"""Backbones for the libraries people already use: Hugging Face ``transformers`` (``Dinov2Model`` /
``Dinov2WithRegistersModel``), timm (``vit_*_patch14_dinov2`` / ``..._reg4_dinov2``) and ONNX.

The conversions are state-dict maps from the official layout this package shares with Meta's code; the target
libraries are optional and imported only by the function that needs them. Every export is checked by loading it
in the real library and comparing its features with ours on the same input (``verify``), at the model's own
resolution: at other sizes each library interpolates positional embeddings its own way (the official code adds an
0.1 offset to the scale factor, transformers and timm resize to the exact grid).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .models import DinoVisionTransformer

FORMATS = ("hf", "timm", "onnx")
_BLOCK = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.(.+)$")  # plain or chunked (blocks.<chunk>.<index>.) keys
# timm's names of the official sizes (embed_dim -> name stem)
_TIMM_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}


# --------------------------------------------------------------------------------------------- description
def describe(model: DinoVisionTransformer) -> dict[str, Any]:
    """The architecture facts a foreign config needs, read off the model itself."""
    block = _flat_blocks(model)[0]
    swiglu = hasattr(block.mlp, "w12")
    hidden = block.mlp.w3.in_features if swiglu else block.mlp.fc1.out_features
    return {
        "embed_dim": model.embed_dim,
        "depth": model.n_blocks,
        "num_heads": model.num_heads,
        "patch_size": model.patch_size,
        "img_size": int(model.patch_embed.img_size[0]),
        "num_register_tokens": int(model.num_register_tokens),
        "swiglu": swiglu,
        "mlp_hidden": int(hidden),
        "layerscale": hasattr(block.ls1, "gamma"),
        "qkv_bias": block.attn.qkv.bias is not None,
    }


def _flat_blocks(model: DinoVisionTransformer) -> list[nn.Module]:
    if getattr(model, "chunked_blocks", False):
        return [b for chunk in model.blocks for b in chunk if not isinstance(b, nn.Identity)]
    return list(model.blocks)


def _split_blocks(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]]]:
    """(non-block entries, {block index: {name inside the block: tensor}})."""
    rest, blocks = {}, {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            rest[key] = value
    return rest, blocks


# --------------------------------------------------------------------------------------------- transformers
def hf_config(model: DinoVisionTransformer):
    """``Dinov2Config`` (or ``Dinov2WithRegistersConfig``) of the same architecture."""
    from transformers import Dinov2Config, Dinov2WithRegistersConfig

    d = describe(model)
    ratio = d["mlp_hidden"] / d["embed_dim"]
    if not d["swiglu"] and not ratio.is_integer():
        raise ValueError(f"hf export: an MLP width of {d['mlp_hidden']} is not an integer multiple of "
                         f"{d['embed_dim']}, which Dinov2Config.mlp_ratio requires")
    common = {"hidden_size": d["embed_dim"], "num_hidden_layers": d["depth"], "num_attention_heads": d["num_heads"],
              "image_size": d["img_size"], "patch_size": d["patch_size"], "use_swiglu_ffn": d["swiglu"],
              "mlp_ratio": 4 if d["swiglu"] else int(ratio), "qkv_bias": d["qkv_bias"],
              "layerscale_value": 1.0, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
    if d["num_register_tokens"]:
        return Dinov2WithRegistersConfig(num_register_tokens=d["num_register_tokens"], **common)
    return Dinov2Config(**common)


def to_hf_state_dict(state: dict[str, Tensor], layerscale: bool = True) -> dict[str, Tensor]:
    """Official backbone keys -> ``Dinov2Model`` / ``Dinov2WithRegistersModel`` keys (transformers >= 5: separate
    q/k/v/o projections). Without LayerScale the HF layer's scale is set to ones (it always has one)."""
    rest, blocks = _split_blocks(state)
    out = {
        "embeddings.cls_token": rest["cls_token"],
        "embeddings.mask_token": rest["mask_token"].reshape(1, -1),
        "embeddings.position_embeddings": rest["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": rest["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": rest["patch_embed.proj.bias"],
        "layernorm.weight": rest["norm.weight"],
        "layernorm.bias": rest["norm.bias"],
    }
    if "register_tokens" in rest:
        out["embeddings.register_tokens"] = rest["register_tokens"]
    for i, b in sorted(blocks.items()):
        p = f"encoder.layer.{i}."
        for n in ("norm1", "norm2"):
            out[p + f"{n}.weight"], out[p + f"{n}.bias"] = b[f"{n}.weight"], b[f"{n}.bias"]
        for name, w in zip(("q_proj", "k_proj", "v_proj"), b["attn.qkv.weight"].chunk(3, dim=0)):
            out[p + f"attention.{name}.weight"] = w
        if "attn.qkv.bias" in b:
            for name, v in zip(("q_proj", "k_proj", "v_proj"), b["attn.qkv.bias"].chunk(3, dim=0)):
                out[p + f"attention.{name}.bias"] = v
        out[p + "attention.o_proj.weight"], out[p + "attention.o_proj.bias"] = b["attn.proj.weight"], b["attn.proj.bias"]
        for t in ("weight", "bias"):
            if f"mlp.w12.{t}" in b:  # SwiGLU: silu(gate) * value, gate first in the fused projection
                out[p + f"mlp.gate_proj.{t}"], out[p + f"mlp.up_proj.{t}"] = b[f"mlp.w12.{t}"].chunk(2, dim=0)
                out[p + f"mlp.down_proj.{t}"] = b[f"mlp.w3.{t}"]
            elif f"mlp.fc1.{t}" in b:
                out[p + f"mlp.fc1.{t}"], out[p + f"mlp.fc2.{t}"] = b[f"mlp.fc1.{t}"], b[f"mlp.fc2.{t}"]
        dim = b["norm1.weight"].shape[0]
        for ls in ("1", "2"):
            gamma = b.get(f"ls{ls}.gamma") if layerscale else None
            out[p + f"layer_scale{ls}.lambda1"] = gamma if gamma is not None else torch.ones(dim)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export_hf(model: DinoVisionTransformer, out_dir: str | Path) -> Path:
    """``save_pretrained`` folder (config.json + model.safetensors) that ``AutoModel.from_pretrained`` loads."""
    from transformers import Dinov2Model, Dinov2WithRegistersModel

    config = hf_config(model)
    cls = Dinov2WithRegistersModel if model.num_register_tokens else Dinov2Model
    hf = cls(config).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), layerscale=describe(model)["layerscale"]), strict=True)
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    return out_dir


def hf_features(out_dir: str | Path) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """(CLS, patch tokens) of the saved HF model, both after the final LayerNorm, as ours."""
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(str(out_dir)).eval()
    n_reg = getattr(hf.config, "num_register_tokens", 0)

    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        h = hf(pixel_values=x).last_hidden_state
        return h[:, 0], h[:, 1 + n_reg:]

    return run


# --------------------------------------------------------------------------------------------- timm
def timm_name(model: DinoVisionTransformer) -> str:
    """The timm architecture to build (its size stem only names the default widths; ours are passed as kwargs)."""
    d = describe(model)
    # timm's giant DINOv2 variants are the ones built with its packed SwiGLU MLP (fc1 = [x; gate], SiLU on x)
    size = "giant" if d["swiglu"] else _TIMM_SIZES.get(d["embed_dim"], "small")
    return f"vit_{size}_patch14_reg4_dinov2" if d["num_register_tokens"] else f"vit_{size}_patch14_dinov2"


def timm_kwargs(model: DinoVisionTransformer) -> dict[str, Any]:
    d = describe(model)
    # timm sizes the MLP as int(embed_dim * mlp_ratio) hidden units; its packed SwiGLU splits them in two halves
    # (ours: fused w12 -> x, gate), so the ratio asks for twice our hidden width (+0.5: no float round-down)
    hidden = 2 * d["mlp_hidden"] if d["swiglu"] else d["mlp_hidden"]
    # LayerScale always on: timm drops a None init_values and would build it anyway; without it ours gets ones
    kw = {"img_size": d["img_size"], "patch_size": d["patch_size"], "embed_dim": d["embed_dim"], "depth": d["depth"],
          "num_heads": d["num_heads"], "mlp_ratio": (hidden + 0.5) / d["embed_dim"], "qkv_bias": d["qkv_bias"],
          "init_values": 1.0, "num_classes": 0}
    if d["num_register_tokens"]:
        kw.update(reg_tokens=d["num_register_tokens"], no_embed_class=True)
    return kw


def to_timm_state_dict(state: dict[str, Tensor], num_register_tokens: int = 0) -> dict[str, Tensor]:
    """Official keys -> timm ``VisionTransformer`` keys. timm's register models add positions to the patches only
    (``no_embed_class``), so the CLS token absorbs its own positional embedding; the iBOT mask token is dropped."""
    out = {k: v for k, v in state.items() if k not in ("mask_token", "register_tokens")}
    if num_register_tokens:
        out["reg_token"] = state["register_tokens"]
        out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        out["pos_embed"] = state["pos_embed"][:, 1:]
    flat = {}
    swiglu_names = {"mlp.w12.": "mlp.fc1.", "mlp.w3.": "mlp.fc2."}  # timm's SwiGLUPacked: fc1 = [x; gate], fc2
    for k, v in out.items():
        m = _BLOCK.match(k)
        if m:
            inner = m.group(2)
            for ours, theirs in swiglu_names.items():
                inner = inner.replace(ours, theirs) if inner.startswith(ours) else inner
            k = f"blocks.{m.group(1)}.{inner}"
        flat[k] = v.detach().clone().contiguous()
    for key in [k for k in flat if k.endswith(".norm1.weight")]:  # no LayerScale: timm's is set to identity
        for ls in ("ls1", "ls2"):
            flat.setdefault(key.replace("norm1.weight", f"{ls}.gamma"), torch.ones_like(flat[key]))
    return flat


def export_timm(model: DinoVisionTransformer, out_dir: str | Path) -> Path:
    """``model.safetensors`` + ``config.json`` ({"architecture", "kwargs"}) for ``timm.create_model``."""
    import timm
    from safetensors.torch import save_file

    name, kwargs = timm_name(model), timm_kwargs(model)
    state = to_timm_state_dict(model.state_dict(), model.num_register_tokens)
    timm.create_model(name, pretrained=False, **kwargs).load_state_dict(state, strict=True)  # fails here, not later
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"architecture": name, "kwargs": kwargs}, indent=2) + "\n")
    return out_dir


def timm_features(out_dir: str | Path) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    import timm
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())
    m = timm.create_model(cfg["architecture"], pretrained=False, **cfg["kwargs"]).eval()
    m.load_state_dict(load_file(str(out_dir / "model.safetensors")), strict=True)

    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        h = m.forward_features(x)
        return h[:, 0], h[:, m.num_prefix_tokens:]

    return run


# --------------------------------------------------------------------------------------------- ONNX
class _Features(nn.Module):
    def __init__(self, model: DinoVisionTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.model.forward_features(x)
        return f["x_norm_clstoken"], f["x_norm_patchtokens"]


def _cubic(x: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel (a = -0.75 in torch's bicubic, -0.5 in its antialiased bicubic, as PIL)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _resize_matrix(out_len: Tensor, in_len: int, scale: Tensor, antialias: bool) -> Tensor:
    """[out_len, in_len] weights of torch's 1-D bicubic resize (``align_corners=False``) along one axis, built from
    tensor ops so an ONNX graph traced at one size computes them for any size. ``scale`` is in/out, as torch maps
    output to input coordinates; plain bicubic clamps out-of-range taps to the border, the antialiased one (torch's
    ``_upsample_bicubic2d_aa``) drops them and renormalises, with a support widened by the scale when shrinking."""
    i = torch.arange(out_len, dtype=torch.float32)[:, None]
    j = torch.arange(in_len, dtype=torch.float32)[None, :]
    if not antialias:
        real = scale * (i + 0.5) - 0.5
        start = torch.floor(real)
        t = real - start
        weights = torch.zeros_like(i * j)
        for k, w in enumerate((_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75), _cubic(2 - t, -0.75))):
            tap = torch.clamp(start - 1 + k, 0, in_len - 1)
            weights = weights + w * (j == tap).float()
        return weights
    shrink = scale >= 1
    support = torch.where(shrink, 2 * scale, torch.full_like(scale, 2.0))
    invscale = torch.where(shrink, 1 / scale, torch.ones_like(scale))
    center = scale * (i + 0.5)
    lo = torch.clamp(torch.floor(center - support + 0.5), min=0)
    hi = torch.clamp(torch.floor(center + support + 0.5), max=in_len)
    weights = _cubic((j - center + 0.5) * invscale, -0.5) * ((j >= lo) & (j < hi)).float()
    return weights / weights.sum(dim=1, keepdim=True)


def _traceable_pos_encoding(model: DinoVisionTransformer) -> Callable[[Tensor, int, int], Tensor]:
    """``model.interpolate_pos_encoding`` rewritten as tensor ops (two resize matrices around the table), equal to it
    within float rounding at every size, so an ONNX export takes any image size that is a multiple of the patch;
    the model's own size keeps the table unchanged, as the original does."""

    def interpolate(x: Tensor, w: int, h: int) -> Tensor:
        table = model.pos_embed.float()
        n, dim = table.shape[1] - 1, table.shape[-1]
        m = math.isqrt(n)
        gh = torch.as_tensor(w // model.patch_size)
        gw = torch.as_tensor(h // model.patch_size)
        offset = float(model.interpolate_offset)
        mats = []
        for g in (gh, gw):
            scale = m / (g.float() + offset) if offset else m / g.float()
            mats.append(_resize_matrix(g, m, scale, bool(model.interpolate_antialias)))
        same = ((gh == m) & (gw == m)).float()  # the model's own grid: the table as it is
        eye_h = (torch.arange(gh)[:, None] == torch.arange(m)[None, :]).float()
        eye_w = (torch.arange(gw)[:, None] == torch.arange(m)[None, :]).float()
        wh, ww = same * eye_h + (1 - same) * mats[0], same * eye_w + (1 - same) * mats[1]
        grid = torch.einsum("ia,abd,jb->ijd", wh, table[0, 1:].reshape(m, m, dim), ww).reshape(1, -1, dim)
        return torch.cat((table[:, :1], grid), dim=1).to(x.dtype)

    return interpolate


def export_onnx(model: DinoVisionTransformer, out_dir: str | Path, opset: int = 18) -> Path:
    """``model.onnx``: input ``pixel_values`` [batch, 3, H, W], H and W any multiples of the patch (the positional
    table is resized in the graph, as ours does), outputs ``cls`` [batch, D] and ``patch_tokens`` [batch, N, D],
    after the final LayerNorm."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = int(model.patch_embed.img_size[0])
    wrapper = _Features(model.eval())
    was = getattr(model, "attn_backend", None)
    if was is not None:
        model.attn_backend = "eager"  # plain matmul/softmax ops: every ONNX runtime has them
    model.interpolate_pos_encoding = _traceable_pos_encoding(model)  # instance attribute: shadows the method
    try:
        with warnings.catch_warnings():
            # The grid sizes are traced from the input's shape (the test at other sizes proves the graph follows them);
            # the tracer still warns that torch.as_tensor makes constants.
            warnings.filterwarnings("ignore", "torch.as_tensor results are registered as constants",
                                    torch.jit.TracerWarning)
            torch.onnx.export(wrapper, (torch.zeros(2, 3, size, size),), str(out_dir / "model.onnx"),
                              input_names=["pixel_values"], output_names=["cls", "patch_tokens"],
                              dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"},
                                            "cls": {0: "batch"}, "patch_tokens": {0: "batch", 1: "tokens"}},
                              opset_version=opset, dynamo=False)
    finally:
        del model.interpolate_pos_encoding
        if was is not None:
            model.attn_backend = was
    return out_dir


def onnx_features(out_dir: str | Path) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(Path(out_dir) / "model.onnx"), providers=["CPUExecutionProvider"])

    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        cls, patches = session.run(None, {"pixel_values": x.numpy()})
        return torch.from_numpy(cls), torch.from_numpy(patches)

    return run


# --------------------------------------------------------------------------------------------- all formats
EXPORTERS = {"hf": (export_hf, hf_features), "timm": (export_timm, timm_features),
             "onnx": (export_onnx, onnx_features)}


def check_sizes(model: DinoVisionTransformer, fmt: str) -> list[tuple[int, int]]:
    """Image sizes an export is checked at: the model's own, and for ONNX (dynamic height and width) a larger, a
    smaller and a non-square one, all multiples of the patch."""
    size, p = int(model.patch_embed.img_size[0]), int(model.patch_size)
    if fmt != "onnx":
        return [(size, size)]
    smaller = max(p, size - 2 * p)
    return [(size, size), (size + 4 * p, size + 4 * p), (smaller, smaller), (size + 2 * p, smaller)]


@torch.no_grad()
def verify(model: DinoVisionTransformer, fmt: str, out_dir: str | Path, n: int = 4, seed: int = 0) -> float:
    """Max abs difference between our (CLS, patch tokens) and the exported model's, loaded in its own library, on
    ``n`` random images at each of :func:`check_sizes`."""
    run = EXPORTERS[fmt][1](out_dir)
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for height, width in check_sizes(model, fmt):
        x = torch.randn(n, 3, height, width, generator=generator)
        f = model.eval().forward_features(x)
        cls, patches = run(x)
        worst = max(worst, float((cls - f["x_norm_clstoken"]).abs().max()),
                    float((patches - f["x_norm_patchtokens"]).abs().max()))
    return worst


def export(model: DinoVisionTransformer, fmt: str, out_dir: str | Path, tolerance: float = 1e-4) -> dict[str, Any]:
    """Write ``model`` in ``fmt`` (hf / timm / onnx) to ``out_dir``, load it back in that library and check its
    features match ours within ``tolerance``; returns {"format", "path", "max_abs_diff"}."""
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format '{fmt}'; one of {', '.join(FORMATS)}")
    path = EXPORTERS[fmt][0](model, out_dir)
    diff = verify(model, fmt, path)
    if not diff <= tolerance:
        raise RuntimeError(f"{fmt} export at {path}: features differ from ours by {diff:.2e} (> {tolerance:g})")
    return {"format": fmt, "path": str(path), "max_abs_diff": diff}


__all__ = ["FORMATS", "check_sizes", "describe", "export", "export_hf", "export_onnx", "export_timm", "hf_config", "timm_kwargs",
           "timm_name", "to_hf_state_dict", "to_timm_state_dict", "verify"]
