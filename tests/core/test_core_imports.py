"""dinov2_core stays a pure library: no orchestration / storage clients, no pipeline code, no xformers at import."""

import subprocess
import sys

FORBIDDEN = [
    "prefect",
    "dvc",
    "great_expectations",
    "boto3",
    "s3fs",
    "botocore",
    "xformers",
    "tasks",
    "flows",
]
MODULES = [
    "dinov2_core.layers",
    "dinov2_core.models",
    "dinov2_core.heads",
    "dinov2_core.hub",
    "dinov2_core.loss",
    "dinov2_core.data",
    "dinov2_core.train",
    "dinov2_core.cost",
]


def test_core_imports_no_forbidden_modules():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + f"bad = [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}]\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


def test_official_public_names_importable():
    from dinov2_core.heads import DINOHead
    from dinov2_core.layers import DINOHead as LayersHead
    from dinov2_core.layers import MemEffAttention, Mlp, NestedTensorBlock, PatchEmbed, SwiGLUFFNFused  # noqa: F401
    from dinov2_core.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
    from dinov2_core.models import DinoVisionTransformer, vit_base, vit_giant2, vit_large, vit_small  # noqa: F401

    assert LayersHead is DINOHead
    for cls, methods in {
        DINOLoss: [
            "softmax_center_teacher",
            "sinkhorn_knopp_teacher",
            "update_center",
            "apply_center_update",
            "forward",
        ],
        iBOTPatchLoss: [
            "softmax_center_teacher",
            "sinkhorn_knopp_teacher",
            "update_center",
            "apply_center_update",
            "forward",
            "forward_masked",
        ],
        KoLeoLoss: ["pairwise_NNs_inner", "forward"],
        DinoVisionTransformer: [
            "forward_features",
            "forward_features_list",
            "get_intermediate_layers",
            "prepare_tokens_with_masks",
            "interpolate_pos_encoding",
        ],
    }.items():
        for name in methods:
            assert callable(getattr(cls, name)), f"{cls.__name__}.{name}"


def test_config_is_plain_data():
    """Code that only reads settings (the pipeline's params, every stage) must not depend on the model code: the
    config module imports no torch and no other library module, and names exactly the model factories."""
    code = "import sys, dinov2_core.config\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'dinov2_core')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['dinov2_core', 'dinov2_core.config']"
    from dinov2_core.config import HUB_NAMES
    from dinov2_core.models import ARCHS

    assert set(ARCHS) == set(HUB_NAMES)
