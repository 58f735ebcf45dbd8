"""Numerical parity with the reference implementation: stored reference outputs (tests/core/golden, produced by
make_golden.py) vs our model with the same seeded weights, float32, atol 1e-4."""

import pytest
import torch

from dinov2_core.models import DinoVisionTransformer, deterministic_state_dict

from ._util import ATOL, OFFICIAL_COMMIT, golden
from .golden import spec

FEATURE_KEYS = [
    "x_norm_clstoken",
    "x_norm_regtokens",
    "x_norm_patchtokens_sel",
    "x_norm_patchtokens_mean",
    "x_prenorm_sel",
    "x_prenorm_mean",
    "shape_patchtokens",
    "shape_prenorm",
]


def _model(name: str, **overrides) -> DinoVisionTransformer:
    cfg = dict(spec.MODEL_CONFIGS[name], **overrides)
    m = DinoVisionTransformer(**cfg).eval()
    m.load_state_dict(deterministic_state_dict(m, spec.WEIGHT_SEED), strict=True)
    return m


def _assert_close(ours: dict, ref: dict) -> None:
    for k in FEATURE_KEYS:
        if k.startswith("shape"):
            assert torch.equal(ours[k], ref[k]), k
        else:
            torch.testing.assert_close(ours[k], ref[k], atol=ATOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_fixture_metadata():
    meta = golden("vit_outputs.pt")["meta"]
    assert meta["official_commit"] == OFFICIAL_COMMIT
    assert meta["weight_seed"] == spec.WEIGHT_SEED


CASES = [(m, c) for m, cases in spec.CASES_PER_MODEL.items() for c in cases]


@pytest.mark.parametrize("model_name,case", CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_forward_features_matches_reference(model_name, case):
    ref = golden("vit_outputs.pt")["outputs"][model_name][case]
    m = _model(model_name)
    xs, ms = spec.case_inputs(case)
    with torch.no_grad():
        outs = m.forward_features(xs, ms) if len(xs) > 1 else [m.forward_features(xs[0], masks=ms[0])]
    assert len(outs) == len(ref)
    for o, r in zip(outs, ref):
        _assert_close(spec.summarize_features(o), r)


@pytest.mark.parametrize("model_name", spec.INTERMEDIATE_MODELS)
@pytest.mark.parametrize("call", list(spec.INTERMEDIATE_CALLS))
def test_get_intermediate_layers_matches_reference(model_name, call):
    ref = golden("vit_outputs.pt")["outputs"][model_name][f"intermediate/{call}"]
    case, kw = spec.INTERMEDIATE_CALLS[call]
    (x,), _ = spec.case_inputs(case)
    with torch.no_grad():
        ours = spec.summarize_intermediate(_model(model_name).get_intermediate_layers(x, **kw))
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        assert o.keys() == r.keys()
        for k in r:
            torch.testing.assert_close(o[k], r[k], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "model_name,wrong",
    [
        ("vits14_d2", {"interpolate_offset": 0.0}),
        ("vits14_d2", {"interpolate_antialias": True}),
        ("vits14_reg4_d2", {"interpolate_antialias": False}),
        ("vits14_reg4_d2", {"interpolate_offset": 0.1}),
    ],
)
def test_golden_detects_wrong_interpolation_settings(model_name, wrong):
    """The fixtures are sensitive enough: the other release's interpolation settings do not pass."""
    ref = golden("vit_outputs.pt")["outputs"][model_name]["98"][0]
    m = _model(model_name, **wrong)
    (x,), _ = spec.case_inputs("98")
    with torch.no_grad():
        ours = spec.summarize_features(m.forward_features(x))
    err = (ours["x_norm_patchtokens_mean"] - ref["x_norm_patchtokens_mean"]).abs().max().item()
    assert err > 10 * ATOL
