"""Schedules, teacher EMA and optimizer parameter groups."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from dinov2_core.heads import DINOHead
from dinov2_core.train import (
    CosineScheduler,
    apply_optim_scheduler,
    build_schedulers,
    ema_update_,
    fuse_params_groups,
    get_params_groups_with_decay,
    scale_lr,
)

from ._util import tiny_vit


def test_cosine_scheduler_shape_and_endpoints():
    s = CosineScheduler(1.0, 0.1, total_iters=20, warmup_iters=5, start_warmup_value=0.0, freeze_iters=3)
    assert len(s.schedule) == 20
    assert s.schedule[:3].tolist() == [0.0, 0.0, 0.0]  # freeze
    assert s[3] == 0.0 and s[7] == 1.0  # warm-up includes both ends
    assert s[8] == 1.0  # cosine starts at the base value
    assert s[19] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 11 / 12)))  # last cosine step
    assert s[20] == 0.1 and s[10_000] == 0.1  # past the end: final value
    assert np.all(np.diff(s.schedule[8:]) <= 0)


def test_run_schedules_match_paper_settings():
    sch = build_schedulers(
        epochs=10,
        epoch_length=100,
        lr=2e-3,
        min_lr=1e-6,
        warmup_epochs=2,
        weight_decay=0.04,
        weight_decay_end=0.2,
        momentum_teacher=0.994,
        final_momentum_teacher=1.0,
        teacher_temp=0.07,
        warmup_teacher_temp=0.04,
        warmup_teacher_temp_epochs=3,
        freeze_last_layer_epochs=1,
    )
    total = 1000
    assert sch.lr[0] == 0.0 and sch.lr[199] == pytest.approx(2e-3) and sch.lr[total] == 1e-6
    assert max(sch.lr.schedule) == pytest.approx(2e-3)
    assert sch.wd[0] == pytest.approx(0.04) and sch.wd[total - 1] == pytest.approx(0.2, abs=1e-5)
    assert sch.momentum[0] == pytest.approx(0.994) and sch.momentum[total - 1] == pytest.approx(1.0, abs=1e-5)
    assert sch.momentum[total] == 1.0
    # teacher temperature: linear 0.04 -> 0.07 over 3 epochs, then constant
    assert sch.teacher_temp[0] == pytest.approx(0.04) and sch.teacher_temp[299] == pytest.approx(0.07)
    assert sch.teacher_temp[150] == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert sch.teacher_temp[5000] == 0.07
    # prototypes frozen during the first epoch, then the lr schedule
    assert all(sch.last_layer_lr[i] == 0.0 for i in range(100))
    assert sch.last_layer_lr[150] == sch.lr[150] > 0
    assert set(sch.at(10)) == {"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}


def test_lr_scaling_rule():
    assert scale_lr(0.004, 1024) == pytest.approx(0.004)
    assert scale_lr(0.004, 256) == pytest.approx(0.002)


def test_ema_math_on_modules_and_lists():
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    s0 = [p.detach().clone() for p in student.parameters()]
    ema_update_(teacher, student, 0.99)
    for t, a, b in zip(teacher.parameters(), t0, s0):
        torch.testing.assert_close(t.detach(), 0.99 * a + 0.01 * b)
    assert all(torch.equal(p.detach(), s) for p, s in zip(student.parameters(), s0))  # student untouched
    ema_update_(list(teacher.parameters()), list(student.parameters()), 1.0)  # momentum 1: frozen teacher
    for t, a, b in zip(teacher.parameters(), t0, s0):
        torch.testing.assert_close(t.detach(), 0.99 * a + 0.01 * b)
    ema_update_(teacher, student, 0.0)  # momentum 0: copy
    assert all(torch.equal(t.detach(), s) for t, s in zip(teacher.parameters(), s0))
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(3, 2), nn.Linear(3, 3), 0.9)


def test_param_groups_follow_reference_rules():
    m = tiny_vit(depth=2, num_register_tokens=4)
    groups = {
        g["name"]: g for g in get_params_groups_with_decay(m, lr_decay_rate=0.5, patch_embed_lr_mult=0.2)
    }
    n = 2
    # layer 0: patch embed (and its 0.2 multiplier) and tokens; block i -> layer i+1; norm -> n+1
    assert groups["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.5 ** (n + 1) * 0.2)
    for k in ("pos_embed", "cls_token", "register_tokens", "mask_token"):
        assert groups[k]["lr_multiplier"] == pytest.approx(0.5 ** (n + 1))
        assert groups[k]["wd_multiplier"] == 1.0  # the reference decays tokens
    assert groups["blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5**2)
    assert groups["blocks.1.mlp.fc1.weight"]["lr_multiplier"] == pytest.approx(0.5**1)
    assert groups["norm.weight"]["lr_multiplier"] == 1.0
    # no weight decay on biases, norms, LayerScale gammas
    for k in ("blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "blocks.1.ls2.gamma", "norm.bias"):
        assert groups[k]["wd_multiplier"] == 0.0
    assert groups["blocks.0.attn.qkv.weight"]["wd_multiplier"] == 1.0
    assert not any(g["is_last_layer"] for g in groups.values())
    opt_in = {g["name"]: g for g in get_params_groups_with_decay(m, no_wd_on_tokens=True)}
    assert opt_in["pos_embed"]["wd_multiplier"] == 0.0 and opt_in["cls_token"]["wd_multiplier"] == 0.0


def test_param_groups_chunked_blocks_and_heads():
    m = tiny_vit(depth=4, block_chunks=2)
    groups = {g["name"]: g for g in get_params_groups_with_decay(m, lr_decay_rate=0.5)}
    assert groups["blocks.1.3.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5 ** (4 + 1 - 4))
    assert groups["blocks.0.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.5 ** (4 + 1 - 1))
    head = DINOHead(32, 16, hidden_dim=8, bottleneck_dim=4)
    hg = {g["name"]: g for g in get_params_groups_with_decay(head, lr_decay_rate=0.5)}
    assert hg["last_layer.weight_g"]["is_last_layer"] and hg["last_layer.weight_v"]["is_last_layer"]
    assert all(g["lr_multiplier"] == 1.0 for g in hg.values())


def test_fused_groups_drive_an_optimizer():
    m = tiny_vit(depth=2)
    fused = fuse_params_groups(get_params_groups_with_decay(m, lr_decay_rate=0.9, patch_embed_lr_mult=0.2))
    assert sum(len(g["params"]) for g in fused) == len(list(m.parameters()))
    assert len(fused) < len(list(m.parameters()))
    opt = torch.optim.AdamW(fused)
    apply_optim_scheduler(opt, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_multiplier"])
        assert g["weight_decay"] == pytest.approx(0.04 * g["wd_multiplier"])
    assert any(math.isclose(g["lr"], 1e-3 * 0.9**3 * 0.2) for g in opt.param_groups)
