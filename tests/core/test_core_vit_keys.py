"""State-dict compatibility with the released checkpoints: names and shapes written out by hand from the reference
ViT-S/14 architecture (384-d, 6 heads, MLP 1536, LayerScale, 37x37 positional grid + CLS for 518 px)."""

import torch

from dinov2_core import hub
from dinov2_core.models import vit_giant2, vit_small

D, HID, GRID = 384, 1536, 37


def expected_vits14(num_register_tokens: int) -> dict:
    keys = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, GRID * GRID + 1, D),
        "mask_token": (1, D),
        "patch_embed.proj.weight": (D, 3, 14, 14),
        "patch_embed.proj.bias": (D,),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    if num_register_tokens:
        keys["register_tokens"] = (1, num_register_tokens, D)
    for i in range(12):
        p = f"blocks.{i}."
        keys.update(
            {
                p + "norm1.weight": (D,),
                p + "norm1.bias": (D,),
                p + "attn.qkv.weight": (3 * D, D),
                p + "attn.qkv.bias": (3 * D,),
                p + "attn.proj.weight": (D, D),
                p + "attn.proj.bias": (D,),
                p + "ls1.gamma": (D,),
                p + "norm2.weight": (D,),
                p + "norm2.bias": (D,),
                p + "mlp.fc1.weight": (HID, D),
                p + "mlp.fc1.bias": (HID,),
                p + "mlp.fc2.weight": (D, HID),
                p + "mlp.fc2.bias": (D,),
                p + "ls2.gamma": (D,),
            }
        )
    return keys


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_vits14_keys_and_shapes_match_release():
    with torch.device("meta"):
        m = hub.dinov2_vits14(pretrained=False)
    assert _shapes(m) == expected_vits14(0)
    assert len(m.state_dict()) == 7 + 12 * 14


def test_vits14_reg4_keys_and_shapes_match_release():
    with torch.device("meta"):
        m = hub.dinov2_vits14_reg(pretrained=False)
    assert _shapes(m) == expected_vits14(4)
    assert m.num_register_tokens == 4 and m.interpolate_antialias is True and m.interpolate_offset == 0.0


def test_hub_settings_reg_vs_nonreg():
    with torch.device("meta"):
        for name, fn in hub.HUB_MODELS.items():
            if "vitg" in name or "vitl" in name:
                continue  # same code path; keep the test cheap
            m = fn(pretrained=False)
            reg = name.endswith("_reg")
            assert m.num_register_tokens == (4 if reg else 0)
            assert m.interpolate_antialias is reg
            assert m.interpolate_offset == (0.0 if reg else 0.1)
            assert m.patch_size == 14 and m.pos_embed.shape[1] == GRID * GRID + 1


def test_state_dict_order_matches_reference_layout():
    with torch.device("meta"):
        m = vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0, num_register_tokens=4)
    assert list(m.state_dict())[:6] == [
        "cls_token",
        "pos_embed",
        "register_tokens",
        "mask_token",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    ]
    assert list(m.state_dict())[-2:] == ["norm.weight", "norm.bias"]


def test_vitg14_swiglu_hidden_width_matches_release():
    with torch.device("meta"):
        m = hub.dinov2_vitg14(pretrained=False)
    sd = _shapes(m)
    # ViT-g/14: 1536-d, SwiGLU hidden (int(6144 * 2/3) + 7) // 8 * 8 = 4096, 40 blocks
    assert sd["blocks.39.mlp.w12.weight"] == (2 * 4096, 1536)
    assert sd["blocks.39.mlp.w3.weight"] == (1536, 4096)
    assert "blocks.40.norm1.weight" not in sd
    assert not any(".fc1." in k for k in sd)


def test_block_chunks_keep_global_block_index():
    with torch.device("meta"):
        m = vit_giant2(patch_size=14, block_chunks=4, ffn_layer="swiglufused", init_values=1e-5)
    keys = m.state_dict().keys()
    assert "blocks.0.0.attn.qkv.weight" in keys
    assert "blocks.1.10.attn.qkv.weight" in keys  # chunk 1 holds blocks 10..19
    assert "blocks.3.39.ls2.gamma" in keys
    assert len(list(m.iter_blocks())) == 40


def test_no_layerscale_without_init_values():
    with torch.device("meta"):
        m = vit_small(patch_size=14, block_chunks=0, init_values=None)
    assert not any("gamma" in k for k in m.state_dict())
