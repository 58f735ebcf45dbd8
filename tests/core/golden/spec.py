"""What the golden fixtures contain and how their inputs are made (shared by make_golden.py and the tests).

Weights come from ``dinov2_core.models.deterministic_state_dict(model, WEIGHT_SEED)`` and inputs from seeded
generators, so only the reference implementation's *outputs* are stored.
"""

from __future__ import annotations

from typing import Any

import torch

WEIGHT_SEED = 1234
N_SELECTED_PATCHES = 8  # stored patch tokens per image (plus the mean over all patches)

_REG = {"num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0}
_NOREG = {"num_register_tokens": 0, "interpolate_antialias": False, "interpolate_offset": 0.1}
_VITS = {
    "img_size": 518,
    "patch_size": 14,
    "embed_dim": 384,
    "num_heads": 6,
    "mlp_ratio": 4,
    "init_values": 1.0,
    "block_chunks": 0,
}

# name -> DinoVisionTransformer kwargs (valid for both implementations)
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    # real ViT-S/14 geometry, depth cut to 2 to stay cheap: released non-register and register settings
    "vits14_d2": dict(_VITS, depth=2, **_NOREG),
    "vits14_reg4_d2": dict(_VITS, depth=2, **_REG),
    # the full ViT-S/14 (12 blocks), few inputs
    "vits14_full": dict(_VITS, depth=12, **_NOREG),
    # SwiGLU FFN (ViT-g's) in a tiny model
    "swiglu_tiny_reg4": dict(
        img_size=224,
        patch_size=14,
        embed_dim=64,
        num_heads=4,
        depth=2,
        mlp_ratio=4,
        init_values=1.0,
        block_chunks=0,
        ffn_layer="swiglufused",
        **_REG,
    ),
}

# case name -> list of (input shape, input seed, mask seed or None); single-entry lists are plain tensor inputs
CASES: dict[str, list[tuple[tuple[int, ...], int, int | None]]] = {
    "224": [((2, 3, 224, 224), 1, None)],
    "98": [((2, 3, 98, 98), 2, None)],
    "518": [((1, 3, 518, 518), 3, None)],
    "98x140": [((2, 3, 98, 140), 4, None)],
    "224_masked": [((2, 3, 224, 224), 5, 50)],
    "list": [((2, 3, 224, 224), 6, 60), ((3, 3, 98, 98), 7, None)],
}
CASES_PER_MODEL: dict[str, list[str]] = {
    "vits14_d2": list(CASES),
    "vits14_reg4_d2": list(CASES),
    "vits14_full": ["224", "98x140"],
    "swiglu_tiny_reg4": ["224", "98", "224_masked"],
}
# get_intermediate_layers calls: name -> (input case, kwargs)
INTERMEDIATE_CALLS = {
    "last2_reshape_cls": ("98", {"n": 2, "reshape": True, "return_class_token": True, "norm": True}),
    "block0_nonorm": ("98x140", {"n": [0], "reshape": False, "return_class_token": False, "norm": False}),
}
INTERMEDIATE_MODELS = ["vits14_d2", "vits14_reg4_d2"]


def make_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def make_masks(batch: int, n_patches: int, seed: int, ratio: float = 0.35) -> torch.Tensor:
    """Random boolean masks; the last image stays unmasked (as half of the images in training)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand((batch, n_patches), generator=g) < ratio
    m[-1] = False
    return m


def case_inputs(case: str, patch_size: int = 14):
    xs, ms = [], []
    for shape, seed, mseed in CASES[case]:
        xs.append(make_input(shape, seed))
        n = (shape[2] // patch_size) * (shape[3] // patch_size)
        ms.append(None if mseed is None else make_masks(shape[0], n, mseed))
    return xs, ms


def selected(n: int) -> torch.Tensor:
    return torch.linspace(0, n - 1, N_SELECTED_PATCHES).round().long()


def summarize_features(out: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Small float32 digest of a forward_features dict: CLS, registers, a few patches and the patch mean."""
    patches, pre = out["x_norm_patchtokens"], out["x_prenorm"]
    return {
        "x_norm_clstoken": out["x_norm_clstoken"].detach().clone(),
        "x_norm_regtokens": out["x_norm_regtokens"].detach().clone(),
        "x_norm_patchtokens_sel": patches[:, selected(patches.shape[1])].detach().clone(),
        "x_norm_patchtokens_mean": patches.mean(1).detach().clone(),
        "x_prenorm_sel": pre[:, selected(pre.shape[1])].detach().clone(),
        "x_prenorm_mean": pre.mean(1).detach().clone(),
        "shape_patchtokens": torch.tensor(patches.shape),
        "shape_prenorm": torch.tensor(pre.shape),
    }


def summarize_intermediate(res: tuple) -> list[dict[str, torch.Tensor]]:
    out = []
    for item in res:
        patch, cls = item if isinstance(item, tuple) else (item, None)
        flat = patch.flatten(2).transpose(1, 2) if patch.ndim == 4 else patch
        d = {
            "shape": torch.tensor(patch.shape),
            "patch_sel": flat[:, selected(flat.shape[1])].detach().clone(),
            "patch_mean": flat.mean(1).detach().clone(),
        }
        if cls is not None:
            d["cls"] = cls.detach().clone()
        out.append(d)
    return out


# ------------------------------------------------------------------------------------------------- losses
LOSS_K = 64  # prototypes
LOSS_B = 4  # images
LOSS_N_LOCAL = 3
LOSS_PATCHES = 16
TEACHER_TEMP = 0.05


def loss_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(777)
    B, K, N = LOSS_B, LOSS_K, LOSS_PATCHES
    masks = torch.rand((B, N), generator=g) < 0.4
    masks[0, :3] = True  # every image but the last has masked patches
    masks[-1] = False
    return {
        # teacher logits at the scale of a DINO head (|cos| * g ~ 1); the reference Sinkhorn-Knopp overflows beyond
        "teacher_global_1": 0.5 * torch.randn((2 * B, K), generator=g),
        "teacher_global_2": 0.5 * torch.randn((2 * B, K), generator=g),
        "student_global": 3 * torch.randn((2 * B, K), generator=g),
        "student_local": 3 * torch.randn((LOSS_N_LOCAL * B, K), generator=g),
        "teacher_patch_1": 0.5 * torch.randn((B, N, K), generator=g),
        "teacher_patch_2": 0.5 * torch.randn((B, N, K), generator=g),
        "student_patch": 3 * torch.randn((B, N, K), generator=g),
        "masks": masks,
        "koleo_x": torch.randn((8, 32), generator=g),
        "koleo_pair": torch.randn((2, 32), generator=g),
        "koleo_dup": torch.cat([v := torch.randn((3, 32), generator=g), v[:1]]),
        "head_x": torch.randn((5, 32), generator=g),
    }


HEAD_KWARGS = {"in_dim": 32, "out_dim": 64, "nlayers": 3, "hidden_dim": 48, "bottleneck_dim": 16}
