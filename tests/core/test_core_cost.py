"""Parameter and FLOP counting: a hand count of one ViT-S/14 block, meta-device measurements, paper-scale sizes."""

import pytest
import torch

from dinov2_core.cost import ViTSpec, block_flops, count_params, forward_flops, measure_flops, model_cost
from dinov2_core.layers import Block, MemEffAttention, SwiGLUFFNFused
from dinov2_core.models import vit_giant2, vit_small


def test_one_block_flops_hand_count_and_counter():
    d, n = 384, 257  # ViT-S/14 at 224 px: 16x16 patches + CLS
    hand = (
        2 * n * d * 3 * d  # qkv projection
        + 2 * n * n * d  # Q K^T (all heads)
        + 2 * n * n * d  # attention x V
        + 2 * n * d * d  # output projection
        + 2 * n * d * 4 * d * 2  # MLP fc1 + fc2
    )
    assert hand == 1_010_959_872  # ~1.01 GFLOP per block per image
    assert block_flops(ViTSpec.from_arch("vit_small"), n)["total"] == hand
    with torch.device("meta"):
        blk = Block(d, 6, qkv_bias=True, init_values=1.0, attn_class=MemEffAttention)
        x = torch.empty(1, n, d)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        blk(x)
    assert fc.get_total_flops() == hand


def test_swiglu_block_hand_count():
    d, n = 1536, 257
    h = 4096  # ViT-g SwiGLU width
    hand = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 2 * n * d * 2 * h + 2 * n * h * d
    assert block_flops(ViTSpec.from_arch("vit_giant2"), n)["total"] == hand
    with torch.device("meta"):
        blk = Block(d, 24, qkv_bias=True, ffn_layer=SwiGLUFFNFused)
    assert blk.mlp.w3.in_features == h


@pytest.mark.parametrize("reg", [0, 4])
def test_forward_flops_and_params_agree_with_meta_model(reg):
    with torch.device("meta"):
        m = vit_small(patch_size=14, img_size=518, init_values=1.0, block_chunks=0, num_register_tokens=reg)
        x = torch.empty(2, 3, 98, 140)
    spec = ViTSpec.from_arch("vit_small", num_register_tokens=reg)
    assert count_params(spec) == count_params(m) == sum(p.numel() for p in m.parameters())
    assert forward_flops(spec, (98, 140), batch=2)["total"] == measure_flops(m, x)
    fwd_bwd = measure_flops(m, x, backward=True)
    assert 2.9 < fwd_bwd / measure_flops(m, x) < 3.1  # backward ~ 2x forward


def test_paper_scale_vitg_on_meta():
    with torch.device("meta"):
        g = vit_giant2(patch_size=14, img_size=518, ffn_layer="swiglufused", init_values=1.0, block_chunks=0)
    assert count_params(g) == count_params("vit_giant2") == 1_136_480_768  # ~1.1B (DINOv2 Table 2)
    assert all(p.device.type == "meta" for p in g.parameters())
    assert ViTSpec.from_model(g).depth == 40
    assert forward_flops(ViTSpec.from_model(g), 224)["total"] == forward_flops("vit_giant2", 224)["total"]


def test_summary_is_printable():
    s = model_cost("vit_small", 224, batch=8)
    text = str(s)
    assert "vit_small" in text and "22.1 M params" in text and "257 tokens" in text
    assert s.as_dict()["forward_flops"] == forward_flops("vit_small", 224, batch=8)["total"]
    assert s.train_step_gflops == pytest.approx(3 * s.forward_gflops)


def test_saved_activations_counted_on_meta_match_a_real_cpu_pass():
    """The meta-device count (attention matrices left out, as a memory-efficient kernel keeps none) equals what a
    real fused-attention forward on CPU saves for backward; the math path's matrices are exactly B*H*N*N floats."""
    from dinov2_core.cost import count_saved_activations

    torch.manual_seed(0)
    counts = {}
    for device in ("cpu", "meta"):
        with torch.device(device):
            model = vit_small(patch_size=14, img_size=56, depth=2, init_values=1.0)
            x = torch.randn(3, 3, 56, 56)
        counts[device] = count_saved_activations(lambda m=model, x=x: m.forward_features(x), model.parameters())
    cpu, meta = counts["cpu"], counts["meta"]
    assert cpu.attention_matrix_bytes == 0  # PyTorch's fused CPU attention stores no N x N matrix
    assert meta.attention_matrix_bytes == 2 * 3 * 6 * 17 * 17 * 4  # depth x B x heads x N x N x float32
    assert abs(meta.memory_efficient_bytes - cpu.total_bytes) / cpu.total_bytes < 0.01
    # weights are not activations: counting them would add the model's size
    n_params = sum(p.numel() for p in model.parameters())
    assert cpu.total_bytes < 4 * n_params
    # linear in the batch
    with torch.device("meta"):
        x6 = torch.empty(6, 3, 56, 56)
    six = count_saved_activations(lambda: model.forward_features(x6), model.parameters())
    assert abs(six.memory_efficient_bytes / meta.memory_efficient_bytes - 2.0) < 0.01
