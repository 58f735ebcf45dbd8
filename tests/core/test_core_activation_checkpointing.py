"""``runtime.activation_checkpointing``: blocks that recompute their activations in backward give the same numbers as
plain blocks (stochastic depth included: the RNG is replayed), keep nothing of their own for backward, compose with
compiled blocks, and a copy of a wrapped model runs its own weights."""

from __future__ import annotations

import copy

import pytest
import torch

from dinov2_core.layers import checkpoint_blocks, compile_blocks
from dinov2_core.models import DinoVisionTransformer

from .test_core_compile import _loss_and_grads


def _vit(depth: int = 3, drop_path_rate: float = 0.0) -> DinoVisionTransformer:
    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=depth, num_heads=4, init_values=1.0,
                                 drop_path_rate=drop_path_rate).train()


def _inputs(pack: bool):
    g = torch.Generator().manual_seed(1)
    if pack:
        return [torch.randn(4, 3, 56, 56, generator=g), torch.randn(8, 3, 28, 28, generator=g)]
    return torch.randn(4, 3, 56, 56, generator=g)


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.05, 0.3])  # none, per-sample mask, efficient subset (Sec. 5)
@pytest.mark.parametrize("pack", [False, True])
def test_recomputed_blocks_give_the_same_loss_and_gradients(drop_path_rate, pack):
    plain = _vit(drop_path_rate=drop_path_rate)
    wrapped = copy.deepcopy(plain)
    assert checkpoint_blocks(wrapped) == 3
    plain.pack_sequences = wrapped.pack_sequences = pack
    loss_p, grads_p = _loss_and_grads(plain, _inputs(pack))
    loss_w, grads_w = _loss_and_grads(wrapped, _inputs(pack))
    assert grads_w.keys() == grads_p.keys()
    # the same kernels on the same inputs in the same order: equal, not merely close (a recompute with other
    # drop-path draws would differ by O(1))
    assert torch.equal(loss_w, loss_p)
    for name, g in grads_p.items():
        assert torch.equal(grads_w[name], g), name


def _saved_bytes(model, inputs) -> int:
    """Bytes autograd keeps for backward (a checkpointed block's own saves are replaced by its input)."""
    total = 0

    def keep(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.forward_features(inputs)
    return total


@pytest.mark.parametrize("pack", [False, True])
def test_a_recomputed_block_keeps_only_its_input_for_backward(pack):
    """Three more blocks: plain ones keep many activations each (norms, qkv, attention, MLP hidden), recomputed ones
    one, their input; what checkpointing is for."""
    tokens = (4 * 17 + 8 * 5) if pack else 4 * 17  # (batch x tokens) of the inputs, 64-d
    activation = tokens * 64 * 4
    extra = {}
    for wrap in (False, True):
        sizes = []
        for depth in (3, 6):
            model = _vit(depth)
            model.pack_sequences = pack
            if wrap:
                checkpoint_blocks(model)
            sizes.append(_saved_bytes(model, _inputs(pack)))
        extra[wrap] = sizes[1] - sizes[0]
    assert extra[True] == 3 * activation
    assert extra[False] > 3 * 10 * activation  # measured: 26 (packed) to 31 activations per block


def test_checkpointing_composes_with_compiled_blocks_and_deep_copies():
    plain = _vit()
    wrapped = copy.deepcopy(plain)
    compile_blocks(wrapped)
    checkpoint_blocks(wrapped)
    for pack in (False, True):
        plain.pack_sequences = wrapped.pack_sequences = pack
        loss_p, grads_p = _loss_and_grads(plain, _inputs(pack))
        loss_w, grads_w = _loss_and_grads(wrapped, _inputs(pack))
        torch.testing.assert_close(loss_w, loss_p, rtol=1e-5, atol=1e-5)
        for name, g in grads_p.items():  # fp32 sums reassociated by the compiled kernels (as test_core_compile)
            assert (grads_w[name] - g).abs().max() <= 1e-3 * g.abs().max() + 1e-7, name
    assert _saved_bytes(wrapped, _inputs(False)) < _saved_bytes(plain, _inputs(False)) / 3

    copied = copy.deepcopy(wrapped)  # the wrappers are bound to their own block
    x = _inputs(False)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.5)
        assert not torch.allclose(copied.forward_features(x)["x_norm_clstoken"],
                                  wrapped.forward_features(x)["x_norm_clstoken"])
