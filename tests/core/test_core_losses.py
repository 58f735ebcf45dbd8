"""DINO, iBOT and KoLeo losses: reference values (golden), centering math, Sinkhorn-Knopp, hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from dinov2_core.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss, sinkhorn_knopp

from ._util import golden
from .golden import spec

T = spec.TEACHER_TEMP
K, B, NL = spec.LOSS_K, spec.LOSS_B, spec.LOSS_N_LOCAL


def _ref():
    return golden("losses.pt")["values"]


def _close(a, b, atol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(b).float(), atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------------------------- DINO
def test_dino_centering_matches_reference():
    inp, ref = spec.loss_inputs(), _ref()
    dl = DINOLoss(K)
    p1 = dl.softmax_center_teacher(inp["teacher_global_1"], T)
    dl.update_center(inp["teacher_global_1"])
    p2 = dl.softmax_center_teacher(inp["teacher_global_2"], T)
    dl.update_center(inp["teacher_global_2"])
    dl.apply_center_update()
    _close(p1, ref["dino_center_probs_1"])
    _close(p2, ref["dino_center_probs_2"])
    _close(dl.center, ref["dino_center_after"])
    g, l = dl.multicrop_loss(inp["student_global"], p2, inp["student_local"], n_global_crops=2)
    _close(torch.stack([g, l]), ref["dino_multicrop_center"])
    _close(dl([inp["student_global"]], [p2]), ref["dino_forward_pair"])


def test_dino_sinkhorn_matches_reference():
    inp, ref = spec.loss_inputs(), _ref()
    dl = DINOLoss(K)
    q = dl.sinkhorn_knopp_teacher(inp["teacher_global_1"], T)
    _close(q, ref["dino_sk_q"], atol=1e-6)
    g, l = dl.multicrop_loss(inp["student_global"], q, inp["student_local"])
    _close(torch.stack([g, l]), ref["dino_multicrop_sk"])


def test_dino_multicrop_excludes_same_view_pairs():
    dl = DINOLoss(5, student_temp=0.1)
    s = torch.randn(2 * 3, 5)
    t = torch.softmax(torch.randn(2 * 3, 5), -1)
    ce = lambda tt, ss: -(tt * F.log_softmax(ss / 0.1, -1)).sum(-1).mean()
    s0, s1 = s.chunk(2)
    t0, t1 = t.chunk(2)
    g, l = dl.multicrop_loss(s, t)
    _close(g, (ce(t1, s0) + ce(t0, s1)) / 2)
    assert float(l) == 0.0


def test_dino_center_update_is_lazy_ema():
    dl = DINOLoss(3, center_momentum=0.9)
    t = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    dl.update_center(t)
    assert torch.equal(dl.center, torch.zeros(1, 3))  # applied only when the next teacher output is centred
    dl.softmax_center_teacher(t, 0.1)
    _close(dl.center, 0.1 * t.mean(0, keepdim=True))
    dl.apply_center_update()  # idempotent without a new update
    _close(dl.center, 0.1 * t.mean(0, keepdim=True))


# --------------------------------------------------------------------------------------------- Sinkhorn-Knopp
def _manual_sk(scores, temp, iters):
    q = torch.exp(scores / temp).t()
    q = q / q.sum()
    kk, bb = q.shape
    for _ in range(iters):
        q = q / q.sum(1, keepdim=True) / kk
        q = q / q.sum(0, keepdim=True) / bb
    return (q * bb).t()


def test_sinkhorn_is_nearly_doubly_stochastic_with_three_iterations():
    torch.manual_seed(0)
    scores = torch.randn(32, 8) + torch.linspace(0, 2, 8)  # imbalanced prototypes
    q = sinkhorn_knopp(scores, 0.5)
    _close(q.sum(1), torch.ones(32), atol=1e-5)  # each sample is a distribution
    cols = q.sum(0) / (32 / 8)  # each prototype ~ B / K samples
    raw_cols = torch.softmax(scores / 0.5, -1).sum(0) / (32 / 8)
    assert (cols - 1).abs().max() < 0.2 and (cols - 1).abs().max() < (raw_cols - 1).abs().max() / 4
    more = sinkhorn_knopp(scores, 0.5, n_iterations=50).sum(0) / (32 / 8)
    _close(more, torch.ones(8), atol=1e-3)  # converges to doubly stochastic
    _close(q, _manual_sk(scores, 0.5, 3), atol=1e-6)
    assert not torch.allclose(q, _manual_sk(scores, 0.5, 2), atol=1e-6)
    assert not torch.allclose(q, _manual_sk(scores, 0.5, 4), atol=1e-6)
    assert torch.isfinite(sinkhorn_knopp(scores.half(), 0.5)).all()
    # a constant offset changes nothing mathematically, but exp(logit / 0.04) overflows float32 beyond ~3.5
    small = 0.1 * scores
    shifted = small + 4.0
    assert not torch.isfinite(torch.exp(shifted / 0.04)).all()
    _close(sinkhorn_knopp(shifted, 0.04), sinkhorn_knopp(small, 0.04), atol=1e-5)


# --------------------------------------------------------------------------------------------- iBOT
def test_ibot_matches_reference():
    inp, ref = spec.loss_inputs(), _ref()
    il = iBOTPatchLoss(K)
    m = inp["masks"]
    t1 = inp["teacher_patch_1"][m].unsqueeze(0)
    t2 = inp["teacher_patch_2"][m].unsqueeze(0)
    il.softmax_center_teacher(t1, T)
    il.update_center(t1)
    p2 = il.softmax_center_teacher(t2, T).squeeze(0)
    il.update_center(t2)
    il.apply_center_update()
    _close(p2, ref["ibot_center_probs_2"])
    _close(il.center, ref["ibot_center_after"])
    n = int(m.sum())
    w = (1 / m.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(m)[m]
    s = inp["student_patch"][m]
    _close(il.forward_masked(s, p2, m, n_masked_patches=n, masks_weight=w), ref["ibot_forward_masked"])
    _close(il.forward_masked(s, p2, m), ref["ibot_forward_masked_default_weight"])
    padded_s, padded_t = torch.cat([s, torch.zeros(5, K)]), torch.cat([p2, torch.zeros(5, K)])
    _close(
        il.forward_masked(padded_s, padded_t, m, n_masked_patches=n, masks_weight=w),
        ref["ibot_forward_masked_padded"],
    )
    dense_t = F.softmax((inp["teacher_patch_2"] - il.center) / T, dim=-1)
    _close(il.forward(inp["student_patch"], dense_t, m), ref["ibot_forward_dense"])
    q = il.sinkhorn_knopp_teacher(inp["teacher_patch_1"][m], T, n_masked_patches_tensor=torch.tensor([n]))
    _close(q, ref["ibot_sk_q"], atol=1e-6)


def test_ibot_weights_each_image_by_its_masked_patch_count():
    il = iBOTPatchLoss(3, student_temp=1.0)
    masks = torch.tensor([[True, False, False, False], [True, True, True, False], [False] * 4])
    s = torch.randn(3, 4, 3)
    t = torch.softmax(torch.randn(3, 4, 3), -1)
    ce = -(t * F.log_softmax(s, -1)).sum(-1)  # (B, N) per-patch cross-entropy
    expected = (
        ce[0, 0] / 1 + (ce[1, 0] + ce[1, 1] + ce[1, 2]) / 3 + 0.0
    ) / 3  # unmasked image: 0, still counted
    _close(il.forward(s, t, masks), expected)
    _close(il.forward_masked(s[masks], t[masks], masks), expected)
    n_masked = torch.tensor([int(masks.sum())])
    snap = n_masked.clone()
    il.sinkhorn_knopp_teacher(torch.randn(4, 3), 0.1, n_masked)
    assert torch.equal(n_masked, snap)  # the caller's count is not modified in place


# --------------------------------------------------------------------------------------------- KoLeo
def test_koleo_matches_reference():
    inp, ref = spec.loss_inputs(), _ref()
    kl = KoLeoLoss()
    for k in ("koleo_x", "koleo_pair", "koleo_dup"):
        _close(kl(inp[k]), ref[k], atol=1e-4)


def test_koleo_hand_computed():
    kl = KoLeoLoss()
    # three unit vectors: every nearest neighbour is at distance sqrt(2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    _close(kl(x), -math.log(math.sqrt(2)))
    # batch of 2: each is the other's neighbour; scale does not matter (L2-normalised)
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    d = (a / a.norm() - b / b.norm()).norm()
    _close(kl(torch.stack([a, 5 * b])), -torch.log(d))
    # not the squared-cosine variant: orthogonal pair gives -log(sqrt(2)), not 0
    _close(kl(torch.eye(2)), -math.log(math.sqrt(2)))


def test_koleo_finite_with_duplicates_and_batch_two():
    kl = KoLeoLoss()
    x = torch.randn(4, 16)
    x[3] = x[0]
    x.requires_grad_(True)
    loss = kl(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    # duplicates sit at distance eps * sqrt(D) (eps added inside the pairwise distance): -log(~4e-8 + 1e-8) ~ 17
    assert 15 < float(-torch.log(kl.pdist(x[:1].detach(), x[3:].detach()) + 1e-8)) < 20
    pair = torch.randn(2, 16, requires_grad=True)
    kl(pair).backward()
    assert torch.isfinite(pair.grad).all()
    same = torch.ones(2, 16, requires_grad=True)
    v = kl(same)
    v.backward()
    assert torch.isfinite(v) and torch.isfinite(same.grad).all()
    with pytest.raises(ValueError):
        kl(torch.randn(1, 16))
