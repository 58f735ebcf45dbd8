"""`torch.hub.load(<repo>, ..., source="local")` gives the same backbone, features included, as dinov2_core."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dinov2_core import hub
from dinov2_core.models import deterministic_state_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = {"depth": 1, "img_size": 28}


def _saved_weights(tmp_path: Path, constructor, **kw) -> Path:
    with torch.device("meta"):
        ref = constructor(pretrained=False, **kw)
    path = tmp_path / "w.pth"
    torch.save(deterministic_state_dict(ref, 5), path)
    return path


def test_hubconf_offers_the_released_names_and_the_export_loader():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.dependencies == ["torch"]
    assert all(callable(getattr(module, name)) for name in [*hub.HUB_MODELS, "dinov2_export"])


def test_released_constructors_load_through_torch_hub(tmp_path):
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    for name in ("dinov2_vits14", "dinov2_vits14_reg"):
        weights = _saved_weights(tmp_path, hub.HUB_MODELS[name], **TINY)
        via_hub = torch.hub.load(str(ROOT), name, source="local", trust_repo=True, weights=str(weights), **TINY)
        ours = hub.HUB_MODELS[name](pretrained=True, weights=str(weights), **TINY)
        with torch.no_grad():
            diff = (via_hub.eval().forward_features(x)["x_norm_clstoken"]
                    - ours.eval().forward_features(x)["x_norm_clstoken"]).abs().max()
        assert diff <= 1e-6


def test_a_pipeline_export_loads_from_its_model_json(tmp_path):
    kwargs = {"depth": 2, "embed_dim": 192, "num_heads": 3, "img_size": 56}
    weights = _saved_weights(tmp_path, hub.dinov2_vits14, **kwargs)
    (tmp_path / "model.json").write_text(json.dumps({
        "hub": {"constructor": "dinov2_core.hub.dinov2_vits14", "kwargs": kwargs},
        "files": {"teacher_backbone.pth": {"path": weights.name}}}))
    model = torch.hub.load(str(ROOT), "dinov2_export", source="local", trust_repo=True,
                           model_json=str(tmp_path / "model.json"))
    assert model.embed_dim == 192 and len(model.blocks) == 2 and not model.training
    sd = torch.load(weights, weights_only=True)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
