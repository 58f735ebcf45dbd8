"""Losses and EMA under torch.distributed (2 gloo processes on CPU): Sinkhorn-Knopp and centering over ranks equal
the single-process result on the whole batch; EMA works on FSDP2-sharded (DTensor) parameters."""

import subprocess
import sys
from pathlib import Path

import torch

from dinov2_core.loss import DINOLoss, iBOTPatchLoss
from dinov2_core.models import DinoVisionTransformer, deterministic_state_dict


def test_two_rank_losses_and_sharded_ema(tmp_path: Path):
    worker = Path(__file__).with_name("dist_worker.py")
    init = f"file://{tmp_path}/pg"
    out = tmp_path / "rank0.pt"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), "2", init, str(out)], stderr=subprocess.PIPE, text=True
        )
        for r in range(2)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errs)[-3000:]
    res = torch.load(out, weights_only=True)

    g = torch.Generator().manual_seed(0)
    full = torch.randn(12, 10, generator=g)
    patches = torch.randn(14, 10, generator=g)
    dl = DINOLoss(10)
    torch.testing.assert_close(res["dino_sk"], dl.sinkhorn_knopp_teacher(full, 0.1)[:6], atol=1e-6, rtol=1e-5)
    dl.update_center(full)
    dl.apply_center_update()
    torch.testing.assert_close(res["dino_center"], dl.center)
    il = iBOTPatchLoss(10)
    q = il.sinkhorn_knopp_teacher(patches, 0.1, torch.tensor([14]))
    torch.testing.assert_close(res["ibot_sk"], q[:5], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(res["ibot_sk_empty_peer"], q, atol=1e-6, rtol=1e-5)
    # iBOT centre: per-rank token mean, averaged over ranks (the reference semantics)
    expected_center = 0.1 * (patches[:5].mean(0) + patches[5:].mean(0)) / 2
    torch.testing.assert_close(res["ibot_center"].flatten(), expected_center)

    assert bool(res["is_dtensor"])
    cfg = {
        "img_size": 28,
        "patch_size": 14,
        "embed_dim": 16,
        "depth": 2,
        "num_heads": 2,
        "init_values": 1.0,
        "block_chunks": 0,
    }
    s = deterministic_state_dict(DinoVisionTransformer(**cfg), 1)
    t = deterministic_state_dict(DinoVisionTransformer(**cfg), 2)
    for name, value in res["teacher_full"].items():
        torch.testing.assert_close(
            value, 0.9 * t[name] + 0.1 * s[name], msg=lambda m, name=name: f"{name}: {m}"
        )
