"""Plain configuration objects of a DINOv2 training run (field names follow the official config where one exists).

They are the library's contract: the pipeline's typed params are translated into these, and a researcher can build
them by hand. Everything is JSON-friendly (``as_dict`` / ``from_dict``) so a checkpoint can carry its own config and
be loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from ..models import ARCHS, DinoVisionTransformer

# Hub constructors (dinov2_core.hub) by architecture, for the export metadata.
HUB_NAMES = {"vit_small": "dinov2_vits14", "vit_base": "dinov2_vitb14", "vit_large": "dinov2_vitl14",
             "vit_giant2": "dinov2_vitg14"}


def _from_dict(cls, data: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    return cls(**data)


@dataclass
class BackboneConfig:
    """A DinoVisionTransformer: an official factory name plus its keyword arguments.

    ``img_size`` fixes the size of the learned positional table (the global crop size during pre-training, the
    high-resolution size after adaptation); other input sizes interpolate it. ``depth`` / ``embed_dim`` /
    ``num_heads`` override the factory's architecture (small CPU models).
    """

    arch: str = "vit_small"
    patch_size: int = 14
    img_size: int = 224
    num_register_tokens: int = 0
    layerscale: float | None = 1.0e-5
    ffn_layer: str = "mlp"
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = True
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    depth: int | None = None
    embed_dim: int | None = None
    num_heads: int | None = None

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose from {sorted(ARCHS)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")

    def model_kwargs(self, with_drop_path: bool = True) -> dict[str, Any]:
        """Factory keyword arguments. Blocks are never chunked: flat ``blocks.<i>`` keys are the released layout,
        and FSDP2 wraps each block on its own anyway."""
        kw: dict[str, Any] = {
            "patch_size": self.patch_size,
            "img_size": self.img_size,
            "num_register_tokens": self.num_register_tokens,
            "init_values": self.layerscale,
            "ffn_layer": self.ffn_layer,
            "block_chunks": 0,
            "qkv_bias": self.qkv_bias,
            "proj_bias": self.proj_bias,
            "ffn_bias": self.ffn_bias,
            "interpolate_antialias": self.interpolate_antialias,
            "interpolate_offset": self.interpolate_offset,
        }
        for name in ("depth", "embed_dim", "num_heads"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        if with_drop_path:
            kw.update(drop_path_rate=self.drop_path_rate, drop_path_uniform=self.drop_path_uniform)
        return kw

    def build(self, with_drop_path: bool = True) -> DinoVisionTransformer:
        return ARCHS[self.arch](**self.model_kwargs(with_drop_path))

    def hub_spec(self) -> tuple[str, dict[str, Any]]:
        """(constructor name in ``dinov2_core.hub``, keyword arguments) that build this model exactly.

        The hub defaults are the released 518-px models, so everything that may differ is spelled out, except what
        the chosen constructor fixes itself (SwiGLU for ViT-g, the register settings of the ``_reg`` variants).
        """
        name = HUB_NAMES[self.arch]
        kw = self.model_kwargs(with_drop_path=False)
        if self.arch == "vit_giant2":
            if self.ffn_layer not in ("swiglufused", "swiglu"):
                raise ValueError("the hub's ViT-g constructor is SwiGLU-only")
            kw.pop("ffn_layer")
        reg = (self.num_register_tokens, self.interpolate_antialias, self.interpolate_offset)
        if reg == (4, True, 0.0):  # the register models of Darcet et al. 2023
            name += "_reg"
            for k in ("num_register_tokens", "interpolate_antialias", "interpolate_offset"):
                kw.pop(k)
        return name, kw

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        return _from_dict(cls, dict(data))


@dataclass
class HeadConfig:
    """A DINO/iBOT projection head (official defaults: 3 layers, 2048 hidden, 256 bottleneck, 65536 prototypes)."""

    n_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3


@dataclass
class LossConfig:
    """Weights and settings of the three objectives (paper Sec. 3) and of the teacher centering."""

    dino_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    ibot_loss_weight: float = 1.0
    ibot_separate_head: bool = True  # paper Sec. 4: untied heads work better at scale
    dino_head: HeadConfig = field(default_factory=HeadConfig)
    ibot_head: HeadConfig = field(default_factory=HeadConfig)
    centering: str = "sinkhorn_knopp"  # or "centering" (softmax with an EMA centre)
    sinkhorn_iterations: int = 3  # paper Sec. 3 (SwAV-style SK, 3 iterations)
    student_temp: float = 0.1
    center_momentum: float = 0.9
    mask_sample_probability: float = 0.5  # iBOT: share of global crops that are masked (App. B)
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)

    def __post_init__(self) -> None:
        if self.centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {self.centering!r}")
        if isinstance(self.dino_head, dict):
            self.dino_head = HeadConfig(**self.dino_head)
        if isinstance(self.ibot_head, dict):
            self.ibot_head = HeadConfig(**self.ibot_head)
        self.mask_ratio_min_max = tuple(self.mask_ratio_min_max)  # type: ignore[assignment]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mask_ratio_min_max"] = list(self.mask_ratio_min_max)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossConfig:
        return _from_dict(cls, dict(data))


@dataclass
class OptimConfig:
    """Optimisation and schedule settings (official names; lengths in 'epochs' of ``epoch_length`` iterations)."""

    epochs: int = 100
    epoch_length: int = 1250
    base_lr: float = 0.004  # for a global batch of 1024, scaled by sqrt(batch / 1024)
    min_lr: float = 1.0e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30

    @property
    def total_steps(self) -> int:
        return self.epochs * self.epoch_length

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["HUB_NAMES", "BackboneConfig", "HeadConfig", "LossConfig", "OptimConfig", "count_parameters"]
