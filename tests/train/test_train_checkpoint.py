"""Checkpoints of an FSDP2-sharded meta-architecture (one process): round trip of model, optimizer, loss centres and
RNG; atomic layout (temporary folders never count, are cleaned, old checkpoints pruned); exports and hub reload."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dinov2_core.config import OptimConfig
from dinov2_core.train import fsdp
from dinov2_core.train.checkpoint import Checkpointer, capture_rng_state, restore_rng_state
from dinov2_core.train.loop import build_optimizer
from dinov2_core.train.ssl_meta_arch import SSLMetaArch

from .test_train_meta_arch import BB, batch, loss_cfg

pytestmark = pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")


@pytest.fixture
def one_process_group():
    info = fsdp.init_distributed("cpu")
    yield info
    fsdp.destroy_distributed()


def sharded_meta(info, seed=0):
    torch.manual_seed(seed)
    meta = SSLMetaArch(BB, loss_cfg(centering="centering"), n_local_crops=2)
    fsdp.shard_meta_arch(meta, info, shard_single_process=True)
    opt = build_optimizer(meta, OptimConfig(epochs=1, epoch_length=1, warmup_epochs=0))
    for g in opt.param_groups:
        g["lr"] = 1e-3
    return meta, opt


def step(meta, opt, i):
    opt.zero_grad(set_to_none=True)
    meta.forward_backward(batch(2, step=i), teacher_temp=0.05)
    opt.step()
    meta.update_teacher(0.9)


def full(meta):
    return {k: v.clone() for k, v in fsdp.full_state_dict(meta).items()}


def test_round_trip_atomic_layout_and_pruning(one_process_group, tmp_path):
    info = one_process_group
    meta, opt = sharded_meta(info)
    for i in range(2):
        step(meta, opt, i)
    meta.flush_center_updates()
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    torch.manual_seed(123)
    rng_before = torch.rand(3)
    torch.manual_seed(123)
    path = ckpt.save(2, meta, opt, {"digest": "abc", "data": {"position": 2}})
    assert path.name == "step_00000002" and (path / "meta.json").is_file() and (path / "rng_rank0.pt").is_file()
    assert (ckpt.root / "latest").read_text().strip() == "step_00000002"
    expected = full(meta)
    assert torch.count_nonzero(expected["dino_loss.center"]) > 0  # loss centres are part of the state
    step(meta, opt, 2)  # continue: the reference for "same curve after resume"
    after_ref = full(meta)

    # a fresh model + optimizer (different init) restored from the checkpoint is the same model, same optimizer
    meta2, opt2 = sharded_meta(info, seed=5)
    state = ckpt.load(path, meta2, opt2)
    assert state["step"] == 2 and state["digest"] == "abc" and state["rng_restored"]
    assert torch.equal(torch.rand(3), rng_before)  # RNG restored to the saved state
    got = full(meta2)
    assert all(torch.equal(got[k], expected[k]) for k in expected), [k for k in expected if not torch.equal(got[k], expected[k])]
    step(meta2, opt2, 2)
    after = full(meta2)
    assert all(torch.allclose(after[k], after_ref[k], atol=1e-6) for k in after_ref)  # optimizer moments too

    # a half-written save (killed process) is invisible, then cleaned; only the newest `keep` survive
    partial = ckpt.root / ".tmp-step_00000009"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"garbage")
    assert ckpt.latest() == path
    assert ckpt.clean_partial() == [".tmp-step_00000009"] and not partial.exists()
    ckpt.save(3, meta2, opt2, {"digest": "abc"})
    ckpt.save(4, meta2, opt2, {"digest": "abc"})
    assert [s for s, _ in ckpt.list()] == [3, 4]
    assert json.loads((ckpt.latest() / "meta.json").read_text())["step"] == 4


def test_rng_states_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = capture_rng_state()
    a = (torch.rand(2), np.random.rand(2), random.random())
    restore_rng_state(state)
    b = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_parameters_without_gradients_yet_still_round_trip(one_process_group, tmp_path):
    """A parameter that has had no gradient yet (here the mask token) has no AdamW state; the checkpoint must still
    load into a fresh optimizer (which DCP initialises for every parameter)."""
    meta, opt = sharded_meta(one_process_group)
    opt.zero_grad(set_to_none=True)
    meta.forward_backward(batch(2), teacher_temp=0.05)
    token = meta.student["backbone"].mask_token
    token.grad = None  # as if no batch had used it yet
    opt.step()
    assert not opt.state.get(token)
    before = token.full_tensor().clone()
    ckpt = Checkpointer(tmp_path / "ckpt")
    path = ckpt.save(1, meta, opt, {"digest": "x"})
    assert torch.equal(token.full_tensor(), before)  # the zero-lr fill changes no weight
    meta2, opt2 = sharded_meta(one_process_group, seed=3)
    assert ckpt.load(path, meta2, opt2)["step"] == 1
    assert torch.equal(meta2.student["backbone"].mask_token.full_tensor(), before)


def test_checkpoints_on_s3_round_trip_commit_marker_and_pruning(one_process_group, s3_bucket, s3_env):
    """The same contract on a real S3-compatible server: no rename there, so meta.json written last commits a
    step; an uncommitted step (a save killed midway) is invisible and cleaned; the newest `keep` survive."""
    import boto3

    info = one_process_group
    meta, opt = sharded_meta(info)
    step(meta, opt, 0)
    meta.flush_center_updates()
    root = f"s3://{s3_bucket}/runs/pretrain/checkpoints"
    ckpt = Checkpointer(root, keep=2, storage_options={"client_kwargs": {"endpoint_url": s3_env}})
    assert ckpt.latest() is None and ckpt.list() == []
    torch.manual_seed(7)
    rng_before = torch.rand(3)
    torch.manual_seed(7)
    path = ckpt.save(1, meta, opt, {"digest": "abc", "data": {"position": 1}})
    assert path == f"{root}/step_00000001" and ckpt.latest() == path
    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    prefix = "runs/pretrain/checkpoints/step_00000001/"
    assert {prefix + "meta.json", prefix + ".metadata", prefix + "rng_rank0.pt"} <= keys
    expected = full(meta)

    meta2, opt2 = sharded_meta(info, seed=5)
    state = ckpt.load(path, meta2, opt2)
    assert state["step"] == 1 and state["digest"] == "abc" and state["rng_restored"]
    assert torch.equal(torch.rand(3), rng_before)
    got = full(meta2)
    assert all(torch.equal(got[k], expected[k]) for k in expected)

    # a save killed before its commit marker: shards present, no meta.json -> not a checkpoint, then cleaned
    s3.put_object(Bucket=s3_bucket, Key="runs/pretrain/checkpoints/step_00000009/__0_0.distcp", Body=b"garbage")
    s3.put_object(Bucket=s3_bucket, Key="runs/pretrain/checkpoints/step_00000009/.metadata", Body=b"garbage")
    assert ckpt.latest() == path
    assert ckpt.clean_partial() == ["step_00000009"]
    for n in (2, 3):
        ckpt.save(n, meta2, opt2, {"digest": "abc"})
    assert [s for s, _ in ckpt.list()] == [2, 3] and ckpt.read_meta(ckpt.latest())["step"] == 3
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert not any("step_00000001" in k or "step_00000009" in k for k in keys)
    ckpt.clear()
    assert ckpt.list() == []
