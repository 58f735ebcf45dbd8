"""DINO/iBOT projection heads: checkpoint key names, weight normalisation, reference parity, tied/untied builder."""

import pytest
import torch
from torch import nn

from dinov2_core.heads import DINOHead, WeightNormLinear, build_dino_ibot_heads
from dinov2_core.layers import DINOHead as LayersDINOHead
from dinov2_core.models import deterministic_state_dict

from ._util import golden
from .golden import spec


def test_key_names_match_reference_checkpoints():
    h = DINOHead(in_dim=32, out_dim=64, nlayers=3, hidden_dim=48, bottleneck_dim=16)
    shapes = {k: tuple(v.shape) for k, v in h.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (48, 32),
        "mlp.0.bias": (48,),
        "mlp.2.weight": (48, 48),
        "mlp.2.bias": (48,),
        "mlp.4.weight": (16, 48),
        "mlp.4.bias": (16,),
        "last_layer.weight_g": (64, 1),
        "last_layer.weight_v": (64, 16),
    }
    assert LayersDINOHead is DINOHead


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_keys_equal_torch_weight_norm_and_parametrization_keys_load():
    lin = nn.Linear(16, 64, bias=False)
    legacy = torch.nn.utils.weight_norm(nn.Linear(16, 64, bias=False))
    ours = WeightNormLinear(16, 64)
    assert set(legacy.state_dict()) == set(ours.state_dict())
    ours.load_state_dict(legacy.state_dict())
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), legacy(x))
    param = torch.nn.utils.parametrizations.weight_norm(lin)
    assert "parametrizations.weight.original0" in param.state_dict()
    fresh = WeightNormLinear(16, 64)
    fresh.load_state_dict(param.state_dict())
    torch.testing.assert_close(fresh(x), param(x))


def test_weight_norm_rows_have_norm_g():
    layer = WeightNormLinear(8, 5)
    with torch.no_grad():
        layer.weight_g.copy_(torch.arange(1.0, 6.0)[:, None])
        layer.weight_v.mul_(7.0)  # scale of v is irrelevant
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.arange(1.0, 6.0))


def test_head_output_matches_reference():
    ref = golden("losses.pt")["values"]["head_out"]
    h = DINOHead(**spec.HEAD_KWARGS)
    h.load_state_dict(deterministic_state_dict(h, spec.WEIGHT_SEED), strict=True)
    with torch.no_grad():
        out = h(spec.loss_inputs()["head_x"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_head_bottleneck_is_l2_normalised():
    h = DINOHead(in_dim=8, out_dim=4, nlayers=2, hidden_dim=16, bottleneck_dim=6)
    with torch.no_grad():
        h.last_layer.weight_v.copy_(torch.eye(6)[:4])
        out = h(torch.randn(10, 8) * 100)
    assert (out.abs() <= 1 + 1e-6).all()  # |<unit prototype, unit vector>| <= 1 with g = 1


def test_build_heads_untied_by_default_and_tied_option():
    untied = build_dino_ibot_heads(
        32, dino_out_dim=64, dino_hidden_dim=48, dino_bottleneck_dim=16, ibot_out_dim=80
    )
    assert not untied.tied and untied.dino_head is not untied.ibot_head
    assert untied.dino_head.last_layer.out_features == 64 and untied.ibot_head.last_layer.out_features == 80
    assert set(untied.as_module_dict()) == {"dino_head", "ibot_head"}
    tied = build_dino_ibot_heads(
        32, dino_out_dim=64, dino_hidden_dim=48, dino_bottleneck_dim=16, separate_head=False
    )
    assert tied.tied and tied.ibot_head is tied.dino_head
    assert set(tied.as_module_dict()) == {"dino_head"}
