"""Throughput of a full SSL training step at the default profile: ``python -m benchmarks.train_step``.

A step is what the pretrain stage runs per iteration: teacher forward on the global crops (+ heads, Sinkhorn-Knopp),
student forward + backward on all crops (+ heads), DINO/iBOT/KoLeo, gradient clipping, AdamW, EMA. Rows:
  * FSDP2 on a 1-process gloo group, one pass per crop size on CPU (what the stage ran before it skipped FSDP2
    for one process);
  * the stage's configuration (no FSDP with one process), and with the packed multi-crop stream (the GPU path)
    instead of per-size passes; the stage's configuration again after it saved a checkpoint (should be unchanged)
    and with activation checkpointing (`launch.activation_checkpointing`), both with the memory autograd keeps for
    backward ("saved MiB": what checkpointing trades compute for);
  * the stage's configuration fed by the real loader (WebDataset shards of Fashion-MNIST, decoding and multi-crop in
    DataLoader workers), i.e. the end-to-end images/s of training here;
  * a distillation step (params.distill student, a teacher of the pretrain architecture at the adapt resolution).
FLOPs per step are counted by torch.utils.flop_counter on one real step (all matmuls/convolutions/attention of
teacher, student and heads, forward and backward) and reported against the float32 matmul peak measured in the same
run. Writes reports/bench/train_step.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info, measure_matmul_peak_gflops, time_fn, write_json

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", message=".*returned a view tensor.*")


def _synthetic_batch(batch: int, crops, patch_size: int, mask_probability: float, seed: int = 0) -> dict[str, Any]:
    from dinov2_core.data.loader import global_batch_masks, mask_batch_fields
    from dinov2_core.data.masking import MaskingGenerator

    g = torch.Generator().manual_seed(seed)
    gs, ls, nl = crops.global_crops_size, crops.local_crops_size, crops.local_crops_number
    grid = gs // patch_size
    masks = global_batch_masks(0, seed, batch, list(range(2 * batch)), 2,
                               MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid), (0.1, 0.5),
                               mask_probability)
    return {"collated_global_crops": torch.randn(2 * batch, 3, gs, gs, generator=g),
            "collated_local_crops": torch.randn(nl * batch, 3, ls, ls, generator=g), **mask_batch_fields(masks)}


def _stepper(meta, optim_cfg, batch_fn: Callable[[], dict[str, Any]]) -> Callable[[], None]:
    from dinov2_core.train.loop import build_optimizer, clip_gradients

    opt = build_optimizer(meta, optim_cfg)
    for g in opt.param_groups:
        g["lr"], g["weight_decay"] = 1e-4, 0.04
    meta.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        meta.forward_backward(batch_fn(), teacher_temp=0.07)
        clip_gradients(meta, optim_cfg.clip_grad)
        opt.step()
        meta.update_teacher(0.994)

    return step


def _after_checkpoint(meta, step: Callable[[], None], optim_cfg, iters: int) -> float:
    """Seconds per step once the stage has saved a checkpoint: a guard against state a save leaves behind (a gloo
    collective in a one-process group once left OpenMP without spinning threads: ~40% slower steps after it)."""
    from dinov2_core.train.checkpoint import Checkpointer
    from dinov2_core.train.loop import build_optimizer

    with tempfile.TemporaryDirectory() as tmp:
        Checkpointer(Path(tmp), keep=1).save(1, meta, build_optimizer(meta, optim_cfg), {})
    return min(time_fn(step, warmup=1, iters=iters))


def _count_flops(step: Callable[[], None]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def _shards(tmp: Path, n: int = 512) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.train._shards import fashion_shards

    return fashion_shards(tmp, n, 128)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "reports" / "bench" / "train_step.json"))
    if argv is None:  # `python -m benchmarks` calls main() with its own argv
        argv = sys.argv[1:] if __name__ == "__main__" else []
    args = parser.parse_args(argv)

    from dinov2_core.cost import count_saved_activations
    from dinov2_core.layers import checkpoint_blocks
    from dinov2_core.train import fsdp
    from dinov2_core.train.distill_meta_arch import DistillMetaArch
    from dinov2_core.train.engine import TrainSpec, make_loader
    from dinov2_core.train.ssl_meta_arch import SSLMetaArch
    from tasks.params import load_params
    from tasks.train_launch import storage_opener

    params = load_params(args.params)
    p = params.pretrain
    bb = replace(params.model, img_size=p.crops.global_crops_size)
    loss, optim = p.loss, p.optim
    batch = p.data.global_batch_size
    peak = measure_matmul_peak_gflops()
    info = fsdp.init_distributed("cpu")
    rows = []

    def build(shard: bool, pack: bool):
        torch.manual_seed(0)
        meta = SSLMetaArch(bb, loss, n_local_crops=p.crops.local_crops_number)
        if shard:
            fsdp.shard_meta_arch(meta, info, shard_single_process=True)
        meta.set_pack_sequences(pack)
        return meta

    fixed = _synthetic_batch(batch, p.crops, bb.patch_size, loss.mask_sample_probability)
    flops = None
    saved: dict[str, int] = {}  # activation memory of a step (bytes autograd keeps for backward)
    for name, shard, pack in (("SSL step, FSDP2 1 proc, per-size", True, False),
                              ("SSL step, no FSDP, per-size (the stage, 1 process)", False, False),
                              ("SSL step, no FSDP, packed stream", False, True)):
        meta = build(shard, pack)
        step = _stepper(meta, optim, lambda: fixed)
        if flops is None:
            flops = _count_flops(step)
        times = time_fn(step, warmup=1, iters=args.iters)
        rows.append((name, batch, min(times), flops))
        if not shard and not pack:
            saved[name] = count_saved_activations(step, meta.parameters()).total_bytes
            rows.append(("  the same, after a checkpoint save", batch, _after_checkpoint(meta, step, optim, args.iters),
                         flops))
            # `launch.activation_checkpointing`: the blocks recompute their activations in backward
            meta = build(False, False)
            checkpoint_blocks(meta)
            step = _stepper(meta, optim, lambda: fixed)
            name = "  the same, activation checkpointing"
            rows.append((name, batch, min(time_fn(step, warmup=1, iters=args.iters)), flops))
            saved[name] = count_saved_activations(step, meta.parameters()).total_bytes

    with tempfile.TemporaryDirectory() as tmp:
        index = _shards(Path(tmp))
        data = replace(p.data, shards=str(index))
        spec = TrainSpec(stage="bench", out=Path(tmp), build=None, init_fresh=None, export=None, data=data,
                         crops=p.crops, loss=loss, optim=optim, checkpoint_every=0, checkpoint_keep=1,
                         digest_payload={})
        loader = iter(make_loader(spec, bb.patch_size, 0, 1, 0, pin_memory=False, opener=storage_opener(params)))
        step = _stepper(build(False, False), optim, lambda: next(loader))
        times = time_fn(step, warmup=2, iters=args.iters)
        loader.close()
        rows.append((f"SSL step + loader (batched crops, {data.num_workers} workers)", batch, min(times), flops))
        # The input path before batch_augment: per-image PIL/v2 multi-crop in 2 DataLoader workers, side by side.
        per_image = _per_image_loader(spec, params, bb.patch_size, workers=2)
        step = _stepper(build(False, False), optim, lambda: next(per_image))
        times = time_fn(step, warmup=2, iters=args.iters)
        per_image.close()
        rows.append(("SSL step + loader (per-image crops, 2 workers)", batch, min(times), flops))

    d = params.distill
    teacher_bb = replace(bb, img_size=params.adapt.crops.global_crops_size)
    student_bb = replace(d.student, img_size=d.crops.global_crops_size)
    torch.manual_seed(0)
    dmeta = DistillMetaArch(student_bb, teacher_bb, replace(d.loss, dino_head=loss.dino_head,
                                                            ibot_head=loss.ibot_head),
                            n_local_crops=d.crops.local_crops_number)
    fsdp.shard_meta_arch(dmeta, info)  # one process: plain modules, as the stage runs them
    dmeta.set_pack_sequences(False)
    dbatch = _synthetic_batch(d.data.global_batch_size, d.crops, student_bb.patch_size, 0.0)
    step = _stepper(dmeta, d.optim, lambda: dbatch)
    dflops = _count_flops(step)
    rows.append(("distill step (student <- frozen teacher)", d.data.global_batch_size,
                 min(time_fn(step, warmup=1, iters=args.iters)), dflops))
    fsdp.destroy_distributed()
    peak = max(peak, measure_matmul_peak_gflops())  # before and after: a transient load must not lower the peak

    print(f"float32 matmul peak (measured, best of before/after): {peak:,.1f} GFLOP/s; "
          f"threads {torch.get_num_threads()}")
    print(f"model: {bb.arch} depth {bb.depth} dim {bb.embed_dim}, crops 2x{p.crops.global_crops_size} + "
          f"{p.crops.local_crops_number}x{p.crops.local_crops_size} px, batch {batch}")
    print(f"{'workload':<48} {'batch':>5} {'s/step':>7} {'img/s':>7} {'GFLOP/step':>10} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'saved MiB':>9}")
    results = []
    for name, b, sec, fl in rows:
        gflops = fl / sec / 1e9
        mib = saved[name] / 2**20 if name in saved else None
        print(f"{name:<48} {b:>5} {sec:>7.3f} {b / sec:>7.1f} {fl / 1e9:>10.2f} {gflops:>8.1f} {gflops / peak:>7.1%} "
              f"{'' if mib is None else f'{mib:.0f}':>9}")
        results.append({"workload": name, "batch": b, "seconds_per_step": sec, "images_per_s": b / sec,
                        "gflop_per_step": fl / 1e9, "achieved_gflops": gflops, "fraction_of_peak": gflops / peak,
                        "saved_for_backward_mib": mib})
    report = {"machine": machine_info(), "matmul_peak_gflops_fp32": peak, "profile": params.profile,
              "results": results, "generated": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(Path(args.out), report)
    return report


def _per_image_loader(spec, params, patch_size: int, workers: int):
    """The stage's loader with the per-image transform (``DataAugmentationDINO``) the batched one replaced."""
    from dinov2_core.data.augmentations import DataAugmentationDINO
    from dinov2_core.data.loader import SSLDataLoader, read_shard_index
    from tasks.train_launch import storage_opener

    opener = storage_opener(params)
    crops = spec.crops
    transform = DataAugmentationDINO(
        global_crops_scale=tuple(crops.global_crops_scale), local_crops_scale=tuple(crops.local_crops_scale),
        local_crops_number=crops.local_crops_number, global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size)
    return iter(SSLDataLoader(
        read_shard_index(spec.data.shards, opener=opener), transform, global_batch_size=spec.data.global_batch_size,
        streams=spec.data.streams, patch_size=patch_size, global_crops_size=crops.global_crops_size, rank=0,
        world_size=1, seed=spec.data.seed, start_step=0, num_workers=workers, opener=opener,
        mask_ratio_tuple=tuple(spec.loss.mask_ratio_min_max), mask_probability=spec.loss.mask_sample_probability,
        pin_memory=False))


if __name__ == "__main__":
    main()
