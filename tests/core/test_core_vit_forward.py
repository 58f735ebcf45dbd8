"""Output contract of the ViT: dict keys and shapes, registers, mask token, list inputs, forward/head."""

import pytest
import torch
from torch import nn

from ._util import tiny_vit


@pytest.mark.parametrize("n_reg", [0, 4])
def test_forward_features_keys_and_shapes(n_reg):
    m = tiny_vit(num_register_tokens=n_reg)
    x = torch.randn(3, 3, 42, 70)  # 3x5 patch grid, positional table interpolated from 4x4
    out = m.forward_features(x)
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_norm_clstoken"].shape == (3, 32)
    assert out["x_norm_regtokens"].shape == (3, n_reg, 32)
    assert out["x_norm_patchtokens"].shape == (3, 15, 32)
    assert out["x_prenorm"].shape == (3, 1 + n_reg + 15, 32)
    assert out["masks"] is None
    # normalised outputs are the final LayerNorm of x_prenorm, split CLS | registers | patches
    normed = m.norm(out["x_prenorm"])
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0])
    torch.testing.assert_close(out["x_norm_regtokens"], normed[:, 1 : 1 + n_reg])
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 1 + n_reg :])


def test_registers_change_outputs_and_have_no_positional_embedding():
    m = tiny_vit(num_register_tokens=4)
    x = torch.randn(1, 3, 56, 56)
    tokens = m.prepare_tokens_with_masks(x)
    assert tokens.shape == (1, 1 + 4 + 16, 32)
    torch.testing.assert_close(
        tokens[0, 1:5], m.register_tokens[0]
    )  # raw register values, no pos_embed added
    torch.testing.assert_close(tokens[0, 0], (m.cls_token + m.pos_embed[:, :1])[0, 0])


def test_mask_token_replaces_masked_patches():
    m = tiny_vit()
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    tok = m.prepare_tokens_with_masks(x, masks)
    pos = m.pos_embed[0, 1:]
    torch.testing.assert_close(tok[0, 1 + 5], m.mask_token[0] + pos[5])
    torch.testing.assert_close(tok[1], m.prepare_tokens_with_masks(x[1:])[0])  # unmasked image untouched
    with torch.no_grad():
        masked = m.forward_features(x, masks=masks)
        plain = m.forward_features(x)
    assert masked["masks"] is masks
    assert not torch.allclose(masked["x_norm_clstoken"][0], plain["x_norm_clstoken"][0], atol=1e-4)
    torch.testing.assert_close(masked["x_norm_clstoken"][1], plain["x_norm_clstoken"][1], atol=1e-5, rtol=0)
    # all-False masks are the same as no masks
    with torch.no_grad():
        none_masked = m.forward_features(x, masks=torch.zeros(2, 16, dtype=torch.bool))
    torch.testing.assert_close(none_masked["x_prenorm"], plain["x_prenorm"])


@pytest.mark.parametrize("n_reg", [0, 4])
def test_list_input_gives_one_dict_per_tensor(n_reg):
    m = tiny_vit(num_register_tokens=n_reg)
    g, l = torch.randn(2, 3, 56, 56), torch.randn(5, 3, 28, 28)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, :3] = True
    with torch.no_grad():
        outs = m.forward_features([g, l], [masks, None])
        ref_g, ref_l = m.forward_features(g, masks), m.forward_features(l)
    assert isinstance(outs, list) and len(outs) == 2
    assert outs[0]["x_norm_patchtokens"].shape == (2, 16, 32)
    assert outs[1]["x_norm_patchtokens"].shape == (5, 4, 32)
    assert outs[0]["masks"] is masks and outs[1]["masks"] is None
    for o, r in ((outs[0], ref_g), (outs[1], ref_l)):
        for k in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(o[k], r[k], atol=1e-5, rtol=0)
    # masks may be omitted for lists
    with torch.no_grad():
        outs2 = m.forward_features([g, l])
    torch.testing.assert_close(outs2[1]["x_prenorm"], outs[1]["x_prenorm"], atol=1e-5, rtol=0)


def test_forward_returns_head_of_cls_or_dict():
    m = tiny_vit()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        cls = m(x)
        d = m(x, is_training=True)
    torch.testing.assert_close(cls, d["x_norm_clstoken"])
    m.head = nn.Linear(32, 7)
    with torch.no_grad():
        assert m(x).shape == (2, 7)


def test_get_intermediate_layers_shapes():
    m = tiny_vit(num_register_tokens=4)
    x = torch.randn(2, 3, 28, 42)
    out = m.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert len(out) == 2
    patches, cls = out[1]
    assert patches.shape == (2, 32, 2, 3) and cls.shape == (2, 32)
    # last layer, normed == forward_features' normalised patch tokens
    with torch.no_grad():
        ff = m.forward_features(x)
        (last,) = m.get_intermediate_layers(x, n=1)
    torch.testing.assert_close(last, ff["x_norm_patchtokens"])
    (first,) = m.get_intermediate_layers(x, n=[0], norm=False)
    assert first.shape == (2, 6, 32)
    with pytest.raises(ValueError):
        m.get_intermediate_layers(x, n=[5])


def test_positional_table_used_as_is_at_native_size():
    m = tiny_vit()
    x = torch.randn(1, 1 + 16, 32)
    assert m.interpolate_pos_encoding(x, 56, 56) is m.pos_embed
    assert m.interpolate_pos_encoding(torch.randn(1, 1 + 4, 32), 28, 28).shape == (1, 5, 32)


def test_input_size_must_be_multiple_of_patch():
    with pytest.raises(ValueError):
        tiny_vit()(torch.randn(1, 3, 50, 56))


def test_chunked_blocks_compute_the_same():
    flat = tiny_vit(block_chunks=0, depth=4)
    chunked = tiny_vit(block_chunks=2, depth=4)
    sd = {k: v for k, v in flat.state_dict().items()}
    remapped = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{k[len('blocks.') :]}"
        remapped[k] = v
    chunked.load_state_dict(remapped, strict=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(flat(x), chunked(x))
        a = flat.get_intermediate_layers(x, n=[1, 3])
        b = chunked.get_intermediate_layers(x, n=[1, 3])
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


def test_efficient_stochastic_depth_skips_dropped_samples():
    """At drop rate 0.5 only half the batch goes through each residual branch (DINOv2 Sec. 5)."""
    m = tiny_vit(depth=1, drop_path_rate=0.5, drop_path_uniform=True)
    blk = next(m.iter_blocks())
    seen = []
    blk.mlp.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[:2])))
    m.train()
    m.forward_features(torch.randn(8, 3, 28, 28))
    assert seen == [(4, 5)]  # 4 of 8 images, 1 + 2x2 tokens each
    seen.clear()
    m.forward_features([torch.randn(8, 3, 28, 28), torch.randn(6, 3, 14, 14)])
    # packed stream: 4 kept of 8 (5 tokens each) + 3 kept of 6 (2 tokens each)
    assert seen == [(1, 4 * 5 + 3 * 2)]
    m.eval()
    seen.clear()
    m.forward_features(torch.randn(8, 3, 28, 28))
    assert seen == [(8, 5)]


def test_efficient_stochastic_depth_is_unbiased():
    """index_add of the kept residual scaled by B/kept: the mean over draws equals the full residual."""
    from dinov2_core.layers.drop_path import drop_add_residual_stochastic_depth

    torch.manual_seed(0)
    x = torch.randn(4, 3, 5)
    res = lambda t: 2 * t + 1
    acc = torch.zeros_like(x)
    n = 4000
    for _ in range(n):
        acc += drop_add_residual_stochastic_depth(x, res, 0.5)
    torch.testing.assert_close(acc / n, x + res(x), atol=0.08, rtol=0)
    one = drop_add_residual_stochastic_depth(x, res, 0.5)
    changed = (one != x).flatten(1).any(1)
    assert int(changed.sum()) == 2  # exactly B * (1 - rate) samples got a residual
    torch.testing.assert_close(one[changed], x[changed] + 2 * res(x[changed]))
