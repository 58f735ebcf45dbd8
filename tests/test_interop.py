"""Exports people can use anywhere: each format is written, loaded back in the real library (transformers, timm,
onnxruntime) and must give our features (CLS and patch tokens) within 1e-4; a corrupted conversion is caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dinov2_core import interop
from dinov2_core.hub import dinov2_vitg14, dinov2_vits14, dinov2_vits14_reg

ROOT = Path(__file__).resolve().parents[1]
TINY = {"img_size": 56, "depth": 2, "embed_dim": 64, "num_heads": 2}
MODELS = {  # the shapes this pipeline exports: no LayerScale (its CPU profiles), registers, SwiGLU (ViT-g style)
    "plain-no-layerscale": lambda: dinov2_vits14(pretrained=False, init_values=None, **TINY),
    "reg4-layerscale": lambda: dinov2_vits14_reg(pretrained=False, init_values=1.0, **TINY),
    "swiglu": lambda: dinov2_vitg14(pretrained=False, init_values=1.0, **TINY),
}
CASES = [(m, f) for m in MODELS for f in interop.FORMATS]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _model(name: str):
    torch.manual_seed(0)
    return MODELS[name]().eval()


@pytest.mark.parametrize(("name", "fmt"), CASES)
def test_export_loads_in_its_library_with_our_features(name, fmt, tmp_path):
    model = _model(name)
    result = interop.export(model, fmt, tmp_path / fmt)  # raises above 1e-4
    assert result["max_abs_diff"] <= 1e-4
    # the comparison is not vacuous: the features differ from image to image
    x = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cls = model.forward_features(x)["x_norm_clstoken"]
    assert float(cls.std(0).mean()) > 0.05


def test_a_wrong_conversion_is_caught(tmp_path):
    model = _model("reg4-layerscale")
    interop.export_hf(model, tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    path = next((tmp_path / "hf").glob("*.safetensors"))
    state = load_file(str(path))
    # transformers 5 saves the legacy names (attention.attention.query), which older versions load too
    q = next(n for n in state if n.startswith("encoder.layer.0.") and n.endswith(("query.weight", "q_proj.weight")))
    k = next(n for n in state if n.startswith("encoder.layer.0.") and n.endswith(("key.weight", "k_proj.weight")))
    state[q], state[k] = state[k].clone(), state[q].clone()  # the classic qkv-split mistake
    save_file(state, str(path), metadata={"format": "pt"})
    assert interop.verify(model, "hf", tmp_path / "hf") > 1e-3


def test_timm_builds_swiglu_as_its_packed_giant_mlp(tmp_path):
    """Our fused SwiGLU (w12 -> x, gate; w3) is timm's SwiGLUPacked (fc1, fc2) in its giant DINOv2 model, at any
    width: the exported model has the MLP shapes of ours and loads strictly."""
    model = _model("swiglu")
    interop.export(model, "timm", tmp_path / "timm")
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert cfg["architecture"] == "vit_giant_patch14_dinov2"
    import timm

    built = timm.create_model(cfg["architecture"], pretrained=False, **cfg["kwargs"])
    block = model.blocks[0]
    assert built.blocks[0].mlp.fc1.weight.shape == block.mlp.w12.weight.shape
    assert built.blocks[0].mlp.fc2.weight.shape == block.mlp.w3.weight.shape


def test_cli_exports_a_training_export(tmp_path):
    """`dinov2-pipeline export --to onnx` on a model.json written the way the training stages write it."""
    from dinov2_core.config import BackboneConfig
    from dinov2_core.models import build_backbone
    from dinov2_core.train.export import write_model_json

    cfg = BackboneConfig(patch_size=14, img_size=56, depth=2, embed_dim=64, num_heads=2, layerscale=None)
    torch.manual_seed(0)
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    torch.save(build_backbone(cfg, with_drop_path=False).state_dict(), export_dir / "teacher_backbone.pth")
    write_model_json(export_dir, cfg, {"teacher_backbone.pth": export_dir / "teacher_backbone.pth"}, {})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = Path(sys.executable).parent / "dinov2-pipeline"
    res = subprocess.run([str(cli), "export", str(tmp_path / "onnx"), "--to", "onnx", "--model-json",
                          str(export_dir / "model.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "features match ours" in res.stdout and (tmp_path / "onnx" / "model.onnx").exists()
    bad = subprocess.run([str(cli), "export", str(tmp_path / "x"), "--to", "tflite", "--model-json",
                          str(export_dir / "model.json")], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: --to tflite: one of hf, timm, onnx"]
    assert json.loads((export_dir / "model.json").read_text())["files"]


@pytest.mark.parametrize("name", ["plain-no-layerscale", "reg4-layerscale"])
def test_onnx_takes_any_image_size_that_is_a_multiple_of_the_patch(name, tmp_path):
    """Both ways released models resize the positional table (scale factor + offset; size + antialias) are traced
    as tensor ops, so the graph gives our features at sizes it was not traced at: larger, smaller, non-square."""
    import onnx

    model = _model(name)
    interop.export_onnx(model, tmp_path / "onnx")
    dims = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    run = interop.onnx_features(tmp_path / "onnx")
    for height, width in [(126, 126), (28, 28), (84, 42), (14, 70)]:
        x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height + width))
        with torch.no_grad():
            ours = model.forward_features(x)
        cls, patches = run(x)
        assert patches.shape[1] == (height // 14) * (width // 14)
        assert float((cls - ours["x_norm_clstoken"]).abs().max()) <= 1e-4
        assert float((patches - ours["x_norm_patchtokens"]).abs().max()) <= 1e-4
