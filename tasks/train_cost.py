"""Size and cost of a profile's training stages, computed on the ``meta`` device (no weights are allocated).

`dinov2-pipeline cost -p params.paper.yaml` (or `python -m tasks.train_cost -p params.paper.yaml`)
prints, per stage: backbone parameters, FLOPs of one training iteration (student forward + backward on all crops,
teacher forward on the global crops, both heads), total FLOPs and an estimated number of GPU-hours at an assumed
sustained throughput (``--gpu-tflops`` x ``--mfu``; defaults: A100 bf16 dense peak 312 TFLOP/s at 40% utilisation),
and the memory one GPU needs: FSDP-sharded model states plus the activations its share of the batch keeps for
the backward pass (counted on the meta device, with a memory-efficient attention kernel as on GPU), also with
activation checkpointing (`launch.activation_checkpointing`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from dinov2_core.models import build_backbone
from tasks.params import Params, load_params

A100_BF16_TFLOPS = 312.0
DEFAULT_MFU = 0.40
# Model-state bytes per parameter under FSDP with mixed precision: trainable weights keep an fp32 master copy, an
# fp32 gradient and AdamW's two fp32 moments (4 x 4 B); the EMA teacher / frozen teacher keeps fp32 weights only.
TRAINABLE_STATE_BYTES = 16
FROZEN_STATE_BYTES = 4


def head_flops(in_dim: int, hidden: int, bottleneck: int, nlayers: int, n_prototypes: int) -> int:
    """Forward FLOPs of one token through a DINO head (2 x multiply-accumulates of its linear layers)."""
    dims = [in_dim] + [hidden] * (nlayers - 1) + [bottleneck]
    macs = sum(a * b for a, b in itertools.pairwise(dims)) + bottleneck * n_prototypes
    return 2 * macs


def step_flops(backbone_cfg, crops, loss, global_batch: int, teacher_cfg=None, masked_fraction: float | None = None
               ) -> dict[str, Any]:
    """FLOPs of one iteration for the whole global batch, counted by torch's FLOP counter on meta tensors."""
    import torch

    from dinov2_core.cost import count_params, measure_flops

    with torch.device("meta"):
        student = build_backbone(backbone_cfg, with_drop_path=False)
        teacher = build_backbone(teacher_cfg or backbone_cfg, with_drop_path=False)
    student.pack_sequences = False
    g, l_, n_local = crops.global_crops_size, crops.local_crops_size, crops.local_crops_number
    inputs = [torch.empty(2, 3, g, g, device="meta")]
    if n_local:
        inputs.append(torch.empty(n_local, 3, l_, l_, device="meta"))
    student_fb = measure_flops(student, inputs if len(inputs) > 1 else inputs[0], backward=True)
    teacher_f = measure_flops(teacher, torch.empty(2, 3, g, g, device="meta"))
    n_patches = (g // backbone_cfg.patch_size) ** 2
    if masked_fraction is None:  # expected share of masked patches: p(masked crop) x mean ratio
        lo, hi = loss.mask_ratio_min_max
        masked_fraction = loss.mask_sample_probability * (lo + hi) / 2
    masked = 2 * n_patches * masked_fraction
    dh, ih = loss.dino_head, loss.ibot_head

    def heads(dim: int) -> tuple[float, float]:
        d = head_flops(dim, dh.hidden_dim, dh.bottleneck_dim, dh.nlayers, dh.n_prototypes)
        i = head_flops(dim, ih.hidden_dim, ih.bottleneck_dim, ih.nlayers, ih.n_prototypes)
        return d, i

    sd, si = heads(student.embed_dim)
    td, ti = heads(teacher.embed_dim)
    student_heads = 3 * (sd * (2 + n_local) + si * masked)  # forward + backward
    teacher_heads = td * 2 + ti * masked
    per_image = student_fb + teacher_f + student_heads + teacher_heads
    return {
        "student_params": count_params(student),
        "teacher_params": count_params(teacher),
        "student_fwd_bwd_flops_per_image": int(student_fb),
        "teacher_fwd_flops_per_image": int(teacher_f),
        "heads_flops_per_image": int(student_heads + teacher_heads),
        "flops_per_step": int(per_image * global_batch),
    }


def step_memory(backbone_cfg, crops, loss, global_batch: int, world_size: int, activation_bytes_per_value: int,
                teacher_cfg=None, masked_fraction: float | None = None, checkpointed: bool = False
                ) -> dict[str, Any]:
    """Memory one GPU needs for a training step: its FSDP shard of the model states plus the activations its
    images keep for the backward pass (student backbone on every crop and both heads; the teacher runs without
    autograd). Activations are counted on the meta device in float32 and rescaled to the run's precision.
    ``memory_bytes_per_gpu`` follows ``checkpointed`` (`launch.activation_checkpointing`); both figures are returned.
    With checkpointing a step keeps each block's input, and one block's activations at a time while backward
    recomputes it."""
    import torch

    from dinov2_core.cost import count_params, count_saved_activations
    from dinov2_core.layers import checkpoint_blocks
    from dinov2_core.train.ssl_meta_arch import build_heads

    with torch.device("meta"):
        student = build_backbone(backbone_cfg, with_drop_path=False)
        heads = build_heads(student.embed_dim, loss)
        teacher = build_backbone(teacher_cfg or backbone_cfg, with_drop_path=False)
        teacher_heads = build_heads(teacher.embed_dim, loss) if teacher_cfg is None else {}
    student.pack_sequences = False
    g, l_, n_local = crops.global_crops_size, crops.local_crops_size, crops.local_crops_number
    n_patches = (g // backbone_cfg.patch_size) ** 2
    if masked_fraction is None:
        lo, hi = loss.mask_ratio_min_max
        masked_fraction = loss.mask_sample_probability * (lo + hi) / 2
    n_masked = max(1, round(2 * n_patches * masked_fraction))

    def one_image() -> None:  # the student's part of a step for one image: 2 global + n_local local crops
        crops_in = [torch.empty(2, 3, g, g, device="meta")]
        if n_local:
            crops_in.append(torch.empty(n_local, 3, l_, l_, device="meta"))
        outs = student.forward_features(crops_in)
        cls = torch.cat([o["x_norm_clstoken"] for o in outs])
        heads["dino_head"](cls)
        patches = outs[0]["x_norm_patchtokens"].flatten(0, 1)[:n_masked]
        heads.get("ibot_head", heads["dino_head"])(patches)

    module_params = [*student.parameters(), *(p for h in heads.values() for p in h.parameters())]
    saved = count_saved_activations(one_image, module_params).memory_efficient_bytes
    depth = checkpoint_blocks(student)
    kept = count_saved_activations(one_image, module_params).total_bytes
    saved_checkpointed = kept + (saved - kept) / depth  # + the block being recomputed
    trainable = sum(p.numel() for p in module_params)
    frozen = count_params(teacher) + sum(count_params(h) for h in teacher_heads.values())
    if teacher_cfg is not None:
        frozen += trainable  # distillation keeps an EMA of the student (the exported result) beside the teacher
    per_gpu_batch = -(-global_batch // world_size)
    states = (trainable * TRAINABLE_STATE_BYTES + frozen * FROZEN_STATE_BYTES) / world_size
    per_image = {False: saved / 4 * activation_bytes_per_value, True: saved_checkpointed / 4 * activation_bytes_per_value}
    return {
        "world_size": world_size,
        "batch_per_gpu": per_gpu_batch,
        "trainable_params": trainable,
        "activation_checkpointing": checkpointed,
        "model_state_bytes_per_gpu": int(states),
        "activation_bytes_per_image": int(per_image[checkpointed]),
        "activation_bytes_per_gpu": int(per_image[checkpointed] * per_gpu_batch),
        "memory_bytes_per_gpu": int(states + per_image[checkpointed] * per_gpu_batch),
        # the other setting, to see whether checkpointing would make a model or batch fit (or is not needed)
        "memory_bytes_per_gpu_checkpointed": int(states + per_image[True] * per_gpu_batch),
        "memory_bytes_per_gpu_not_checkpointed": int(states + per_image[False] * per_gpu_batch),
    }


def _activation_bytes_per_value(params: Params) -> int:
    """bf16 activations when the run is on GPU in bf16 (the paper's setting), float32 otherwise."""
    launch = params.launch
    on_gpu = launch.device == "cuda"
    return 2 if on_gpu and launch.precision in ("bf16", "auto") else 4


def train_cost(params: Params, gpu_tflops: float = A100_BF16_TFLOPS, mfu: float = DEFAULT_MFU) -> dict[str, Any]:
    p, a, d = params.pretrain, params.adapt, params.distill
    pre_bb = replace(params.model, img_size=p.crops.global_crops_size)
    loss = p.loss
    stages = {
        "pretrain": (pre_bb, p.crops, loss, p.data.global_batch_size, p.optim, None, None),
        "adapt": (replace(pre_bb, img_size=a.crops.global_crops_size), a.crops, loss, a.data.global_batch_size,
                  a.optim, None, None),
        "distill": (replace(d.student, img_size=d.crops.global_crops_size), d.crops, d.loss,
                    d.data.global_batch_size, d.optim, replace(pre_bb, img_size=a.crops.global_crops_size), 1.0),
    }
    sustained = gpu_tflops * 1e12 * mfu
    out: dict[str, Any] = {"profile": params.profile, "assumed_gpu_tflops": gpu_tflops, "assumed_mfu": mfu}
    total_hours = 0.0
    world = params.launch.nnodes * params.launch.nproc_per_node
    act_bytes = _activation_bytes_per_value(params)
    out["activation_bytes_per_value"] = act_bytes
    for name, (bb, crops, lss, batch, optim, teacher_bb, masked) in stages.items():
        info = step_flops(bb, crops, lss, batch, teacher_cfg=teacher_bb, masked_fraction=masked)
        info.update(step_memory(bb, crops, lss, batch, world, act_bytes, teacher_cfg=teacher_bb,
                                masked_fraction=masked, checkpointed=params.launch.activation_checkpointing))
        steps = optim.epochs * optim.epoch_length
        info.update(arch=bb.arch, img_size=bb.img_size, global_batch=batch, iterations=steps,
                    total_flops=float(info["flops_per_step"]) * steps)
        info["gpu_hours"] = info["total_flops"] / sustained / 3600
        total_hours += info["gpu_hours"]
        out[name] = info
    out["gpu_hours_total"] = total_hours
    return out


def format_cost(cost: dict[str, Any]) -> str:
    header = (f"{'stage':<9} {'arch':<11} {'px':>4} {'student params':>15} {'TFLOP/iter':>11} {'iterations':>10} "
              f"{'total EFLOP':>11} {'GPU-hours':>10} {'GPUs':>5} {'img/GPU':>7} {'GiB/GPU':>8} "
              f"{'(states':>7} {'+ activ.)':>9} {'act.ckpt':>8}")
    title = (f"profile {cost['profile']}: assuming {cost['assumed_gpu_tflops']:.0f} TFLOP/s per GPU at "
             f"{cost['assumed_mfu']:.0%} utilisation; memory with FSDP full sharding, "
             f"{'bf16' if cost['activation_bytes_per_value'] == 2 else 'float32'} activations; "
             f"GiB/GPU {'with' if cost['pretrain']['activation_checkpointing'] else 'without'} activation "
             f"checkpointing, act.ckpt: GiB/GPU with it")
    lines = [title, header]
    gib = 2**30
    for name in ("pretrain", "adapt", "distill"):
        c = cost[name]
        lines.append(f"{name:<9} {c['arch']:<11} {c['img_size']:>4} {c['student_params'] / 1e6:>13.1f} M "
                     f"{c['flops_per_step'] / 1e12:>11.1f} {c['iterations']:>10,} {c['total_flops'] / 1e18:>11.1f} "
                     f"{c['gpu_hours']:>10,.0f} {c['world_size']:>5} {c['batch_per_gpu']:>7} "
                     f"{c['memory_bytes_per_gpu'] / gib:>8.1f} {c['model_state_bytes_per_gpu'] / gib:>7.1f} "
                     f"{c['activation_bytes_per_gpu'] / gib:>9.1f} "
                     f"{c['memory_bytes_per_gpu_checkpointed'] / gib:>8.1f}")
    lines.append(f"{'total':<9} {'':<11} {'':>4} {'':>15} {'':>11} {'':>10} {'':>11} {cost['gpu_hours_total']:>10,.0f}")
    return "\n".join(lines)


def run_train_cost(params: Params) -> dict[str, Any]:
    """Print the table and return the numbers (`dinov2-pipeline cost` prints the same table)."""
    cost = train_cost(params)
    print(format_cost(cost))
    return cost


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-p", "--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--gpu-tflops", type=float, default=A100_BF16_TFLOPS)
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU)
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    cost = train_cost(load_params(args.params), args.gpu_tflops, args.mfu)
    print(json.dumps(cost, indent=2) if args.json else format_cost(cost))
    return 0


if __name__ == "__main__":
    sys.exit(main())
