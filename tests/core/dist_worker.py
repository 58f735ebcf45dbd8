"""Worker of test_core_distributed.py: one rank of a 2-process gloo group on CPU (run as a script)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dinov2_core.loss import DINOLoss, iBOTPatchLoss
    from dinov2_core.models import DinoVisionTransformer, deterministic_state_dict
    from dinov2_core.train import ema_update_

    g = torch.Generator().manual_seed(0)
    full = torch.randn(12, 10, generator=g)  # DINO teacher logits of the whole (global) batch
    patches = torch.randn(14, 10, generator=g)  # iBOT masked-patch logits; ranks hold 5 and 9 rows
    res = {}
    mine = full.chunk(world)[rank]
    dl = DINOLoss(10)
    res["dino_sk"] = dl.sinkhorn_knopp_teacher(mine, 0.1)
    dl.update_center(mine)
    dl.apply_center_update()
    res["dino_center"] = dl.center
    rows = patches[:5] if rank == 0 else patches[5:]
    il = iBOTPatchLoss(10)
    res["ibot_sk"] = il.sinkhorn_knopp_teacher(rows, 0.1, torch.tensor([rows.shape[0]]))
    # a rank without masked patches this step still joins the collectives; rank 0 holds all 14 rows
    lopsided = patches if rank == 0 else patches[:0]
    res["ibot_sk_empty_peer"] = il.sinkhorn_knopp_teacher(lopsided, 0.1, torch.tensor([lopsided.shape[0]]))
    il.update_center(rows.unsqueeze(0))
    il.apply_center_update()
    res["ibot_center"] = il.center

    # FSDP2-sharded teacher/student: EMA on local shards
    mesh = init_device_mesh("cpu", (world,))
    cfg = {
        "img_size": 28,
        "patch_size": 14,
        "embed_dim": 16,
        "depth": 2,
        "num_heads": 2,
        "init_values": 1.0,
        "block_chunks": 0,
    }
    student, teacher = DinoVisionTransformer(**cfg), DinoVisionTransformer(**cfg)
    student.load_state_dict(deterministic_state_dict(student, 1))
    teacher.load_state_dict(deterministic_state_dict(teacher, 2))
    for mod in (student, teacher):
        fully_shard(mod, mesh=mesh)
    from torch.distributed.tensor import DTensor

    res["is_dtensor"] = torch.tensor(all(isinstance(p, DTensor) for p in teacher.parameters()))
    ema_update_(teacher, student, 0.9)
    res["teacher_full"] = {n: p.full_tensor() for n, p in teacher.named_parameters()}
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
