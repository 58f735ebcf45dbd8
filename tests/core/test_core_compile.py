"""``runtime.compile``: torch.compile of every block gives the eager model's numbers (dense batches and the packed
multi-crop stream, forward and backward), and a copy of a compiled model runs its own weights."""

from __future__ import annotations

import copy

import torch

from dinov2_core.layers import compile_blocks
from dinov2_core.models import DinoVisionTransformer


def _loss_and_grads(model, inputs, seed: int = 3):
    """A loss of both outputs and every parameter's gradient; ``seed`` makes stochastic depth draw the same."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    outs = model.forward_features(inputs)
    outs = outs if isinstance(outs, list) else [outs]
    loss = sum(o["x_norm_clstoken"].pow(2).sum() + o["x_norm_patchtokens"].pow(2).mean() for o in outs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_blocks_match_eager_dense_and_packed():
    torch.manual_seed(0)
    eager = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, init_values=1.0,
                                  drop_path_rate=0.0)
    eager.train()
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 2
    dense = torch.randn(2, 3, 56, 56)
    crops = [torch.randn(2, 3, 56, 56), torch.randn(4, 3, 28, 28)]
    for pack, inputs in ((False, dense), (True, crops)):
        eager.pack_sequences = compiled.pack_sequences = pack
        loss_e, grads_e = _loss_and_grads(eager, inputs)
        loss_c, grads_c = _loss_and_grads(compiled, inputs)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for name, g in grads_e.items():
            # fp32 sums reassociated by the compiled kernels: ~1e-4 of the largest entry (a wrong graph: O(1))
            assert (grads_c[name] - g).abs().max() <= 1e-3 * g.abs().max() + 1e-7, name

    copied = copy.deepcopy(compiled)  # the compiled methods are bound to their own block
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.5)
        assert not torch.allclose(copied.forward_features(dense)["x_norm_clstoken"],
                                  compiled.forward_features(dense)["x_norm_clstoken"])
        torch.testing.assert_close(compiled.forward_features(dense)["x_norm_clstoken"],
                                   eager.forward_features(dense)["x_norm_clstoken"], rtol=1e-5, atol=1e-5)
