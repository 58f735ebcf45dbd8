"""Process group set-up and FSDP2 (``torch.distributed.fsdp.fully_shard``) sharding of a meta-architecture.

Every transformer block is its own FSDP unit (so only one block's full weights live at a time), then each backbone and
each head is a unit. Teacher and student are sharded identically, so the EMA update runs on local shards with no
communication. gloo on CPU, NCCL on GPU; bf16 parameters / fp32 gradient reduction on GPU, plain fp32 on CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no GPU is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/MASTER_ADDR in the environment); without it, a
    one-process group on a free loopback port, so the same code path (FSDP2, DCP) runs everywhere."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {"timeout": timeout}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        if "RANK" not in os.environ:
            # A store on the port the OS hands out while it listens (port 0): a port chosen first and bound later can
            # be taken in between by another process. Nothing goes into os.environ for later code to inherit.
            kwargs.update(store=dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, timeout=timeout),
                          rank=0, world_size=1)
        dist.init_process_group(backend=backend, **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mixed_precision_policy(device: torch.device, precision: str = "auto"):
    """bf16 compute with fp32 gradient reduction on GPU (the official recipe uses fp16 + a grad scaler; bf16 needs
    none); float32 on CPU, where bf16 matmuls are slower and the small models gain nothing."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return None, None
    if precision != "bf16":
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), torch.bfloat16


def _shard(module: nn.Module, mesh, mp_policy, reshard_after_forward: bool = True) -> None:
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    fully_shard(module, **kwargs)


def shard_backbone(backbone: nn.Module, mesh, mp_policy=None, reshard_after_forward: bool = True) -> None:
    """One FSDP unit per block, then the backbone (patch embed, tokens, final norm) as the root unit."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    blocks = list(backbone.iter_blocks()) if hasattr(backbone, "iter_blocks") else list(backbone.blocks)
    for block in blocks:
        _shard(block, mesh, mp_policy, reshard_after_forward)
        if hasattr(block, "forward_packed"):  # the packed stream calls this method, not forward
            register_fsdp_forward_method(block, "forward_packed")
    _shard(backbone, mesh, mp_policy, reshard_after_forward)


def shard_model_dict(models: nn.ModuleDict, mesh, mp_policy=None) -> None:
    for key, module in models.items():
        if key == "backbone":
            shard_backbone(module, mesh, mp_policy)
        else:
            _shard(module, mesh, mp_policy)


def shard_meta_arch(
    meta: nn.Module, info: DistInfo, precision: str = "auto", shard_single_process: bool = False
) -> torch.dtype | None:
    """Shard every ModuleDict of student/teacher networks of ``meta`` in place; returns the autocast dtype.

    One process has nothing to shard and no gradient to reduce, so by default it trains the plain modules
    (``make bench``: the FSDP2 wrappers cost ~18 % of a CPU step there); ``shard_single_process`` keeps the
    sharded path, e.g. to test it. Autocast, EMA and checkpoints work the same on both.
    """
    from torch.distributed.device_mesh import init_device_mesh

    mp_policy, compute_dtype = mixed_precision_policy(info.device, precision)
    if info.world_size == 1 and not shard_single_process:
        return compute_dtype
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for name in ("student", "teacher", "student_ema"):
        models = getattr(meta, name, None)
        if isinstance(models, nn.ModuleDict):
            shard_model_dict(models, mesh, mp_policy)
    return compute_dtype


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict on rank 0 (empty elsewhere). A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not dist.is_initialized():
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=opts)


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar tensors over ranks in one collective; returns Python floats."""
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        stacked = stacked.to("cpu") if dist.get_backend() == "gloo" else stacked
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, stacked.tolist())}


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:  # one rank: nothing to wait for
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "destroy_distributed",
    "full_state_dict",
    "init_distributed",
    "mixed_precision_policy",
    "resolve_device",
    "shard_backbone",
    "shard_meta_arch",
    "shard_model_dict",
]
