"""Attention backends and sequence packing give the same numbers (forward and gradients)."""

import pytest
import torch

from dinov2_core.layers import Attention, PackedSequences, xformers_available
from dinov2_core.layers.attention import resolve_attention_backend

from ._util import tiny_vit

CPU_BACKENDS = ["sdpa", "packed_sdpa", "eager"]


def _run(model, xs, masks=None):
    model.zero_grad(set_to_none=True)
    outs = model.forward_features(xs, masks)
    outs = outs if isinstance(outs, list) else [outs]
    loss = sum((o["x_norm_clstoken"] ** 2).sum() + o["x_norm_patchtokens"].pow(3).mean() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o["x_prenorm"].detach() for o in outs], grads


def _assert_same(a, b, atol=2e-5):
    (outs_a, g_a), (outs_b, g_b) = a, b
    for u, v in zip(outs_a, outs_b):
        torch.testing.assert_close(u, v, atol=atol, rtol=1e-4)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for k in g_a:
        torch.testing.assert_close(g_a[k], g_b[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("n_reg", [0, 4])
def test_backends_agree_on_dense_input(n_reg):
    x = torch.randn(3, 3, 56, 42)
    results = {}
    for b in CPU_BACKENDS:
        m = tiny_vit(num_register_tokens=n_reg, attn_backend=b).train()
        assert all(a.backend == b for a in m.modules() if isinstance(a, Attention))
        results[b] = _run(m, x)
    _assert_same(results["eager"], results["sdpa"])
    _assert_same(results["eager"], results["packed_sdpa"])


@pytest.mark.parametrize("n_reg", [0, 4])
def test_packing_equals_unpacked_for_every_backend(n_reg):
    """Global + local crops as one packed stream == each crop batch through the model on its own."""
    g, l = torch.randn(2, 3, 56, 56), torch.randn(4, 3, 28, 28)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, 2:7] = True
    ref = tiny_vit(num_register_tokens=n_reg, attn_backend="eager", pack_sequences=False).train()
    expected = _run(ref, [g, l], [masks, None])
    for b in CPU_BACKENDS:
        m = tiny_vit(num_register_tokens=n_reg, attn_backend=b, pack_sequences=True).train()
        _assert_same(expected, _run(m, [g, l], [masks, None]))


def test_packed_attention_does_not_cross_sequences():
    attn = Attention(16, num_heads=2, qkv_bias=True, backend="packed_sdpa").eval()
    a, b = torch.randn(2, 5, 16), torch.randn(3, 2, 16)
    packed = PackedSequences.from_tensors([a, b])
    out1 = attn(packed.pack([a, b]), packed=packed)
    b2 = b.clone()
    b2[1] += 10.0
    out2 = attn(packed.pack([a, b2]), packed=packed)
    u1, u2 = packed.unpack(out1), packed.unpack(out2)
    torch.testing.assert_close(u1[0], u2[0])  # other group unchanged
    torch.testing.assert_close(u1[1][[0, 2]], u2[1][[0, 2]])  # other sequences of the same group unchanged
    assert not torch.allclose(u1[1][1], u2[1][1])
    # and each sequence equals plain attention on that sequence alone
    torch.testing.assert_close(u1[0], attn(a), atol=1e-6, rtol=0)
    torch.testing.assert_close(u1[1], attn(b), atol=1e-6, rtol=0)


def test_block_diagonal_mask_and_roundtrip():
    xs = [torch.randn(2, 3, 4), torch.randn(1, 2, 4)]
    p = PackedSequences.from_tensors(xs)
    assert p.groups == ((2, 3), (1, 2)) and p.total_tokens == 8 and p.seqlens == [3, 3, 2]
    mask = p.block_diagonal_mask(torch.device("cpu"))
    expected = torch.block_diag(torch.ones(3, 3), torch.ones(3, 3), torch.ones(2, 2)).bool()
    assert torch.equal(mask, expected)
    assert p.block_diagonal_mask(torch.device("cpu")) is mask  # cached for the blocks of one forward
    for u, v in zip(p.unpack(p.pack(xs)), xs):
        assert torch.equal(u, v)
    rows, sub = p.row_index([torch.tensor([1]), None])
    assert rows.tolist() == [3, 4, 5, 6, 7] and sub.groups == ((1, 3), (1, 2))


def test_tensor_attn_mask_same_in_sdpa_and_eager():
    x = torch.randn(2, 6, 16)
    mask = torch.rand(6, 6) > 0.3
    mask |= torch.eye(6, dtype=torch.bool)
    outs = []
    for b in ("sdpa", "eager"):
        torch.manual_seed(0)
        attn = Attention(16, num_heads=4, qkv_bias=True, backend=b).eval()
        outs.append(attn(x, attn_bias=mask))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_causal_attention_same_in_sdpa_and_eager():
    torch.manual_seed(0)
    attn = Attention(16, num_heads=4, qkv_bias=True, backend="sdpa").eval()
    x = torch.randn(2, 6, 16)
    y = attn(x, is_causal=True)
    attn.backend = "eager"
    torch.testing.assert_close(y, attn(x, is_causal=True), atol=1e-5, rtol=0)
    # causal: the first token only sees itself
    x2 = x.clone()
    x2[:, 3:] += 5.0
    torch.testing.assert_close(attn(x2, is_causal=True)[:, :3], y[:, :3], atol=1e-5, rtol=0)


def test_backend_selection_is_explicit_and_per_model():
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu) == "sdpa"
    with pytest.raises(RuntimeError):
        resolve_attention_backend("xformers", cpu)
    with pytest.raises(ValueError):
        resolve_attention_backend("flash9", cpu)
    a, b = tiny_vit(attn_backend="eager"), tiny_vit()
    assert a.attn_backend == "eager" and b.attn_backend == "auto"
    b.attn_backend = "packed_sdpa"
    assert {m.backend for m in b.modules() if isinstance(m, Attention)} == {"packed_sdpa"}
    assert {m.backend for m in a.modules() if isinstance(m, Attention)} == {"eager"}
    with pytest.raises(ValueError):
        a.attn_backend = "nope"


@pytest.mark.skipif(
    not (torch.cuda.is_available() and xformers_available()), reason="needs xformers and CUDA"
)
def test_xformers_matches_sdpa_on_cuda():  # pragma: no cover - GPU only
    g, l = torch.randn(2, 3, 56, 56).cuda(), torch.randn(4, 3, 28, 28).cuda()
    ref = tiny_vit(attn_backend="sdpa").cuda()
    xf = tiny_vit(attn_backend="xformers").cuda()
    with torch.no_grad():
        for a, b in zip(ref.forward_features([g, l]), xf.forward_features([g, l])):
            torch.testing.assert_close(a["x_prenorm"], b["x_prenorm"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ref(g), xf(g), atol=1e-4, rtol=1e-4)
