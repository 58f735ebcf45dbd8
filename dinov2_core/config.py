"""Plain configuration objects of a DINOv2 training run (field names follow the official config where one exists).

The one definition of every training setting and of its official default: a researcher builds them by hand, the
pipeline validates its params into them (``tasks/params.py``), and a checkpoint carries them as JSON (``as_dict`` /
``from_dict``, loadable with ``torch.load(weights_only=True)``). Plain data with no torch import, so code that only
reads settings (the pipeline's params) does not depend on the model code.

Constraints are ``annotated-types`` metadata: a dataclass built by hand is not checked (as in the official code);
pydantic enforces them when it validates into these classes and names the offending key. ``STRICT`` (each class's
``__pydantic_config__``) makes an unknown key an error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Gt, Interval

PosInt = Annotated[int, Gt(0)]
NonNegInt = Annotated[int, Ge(0)]
PosFloat = Annotated[float, Gt(0.0)]
NonNegFloat = Annotated[float, Ge(0.0)]
Fraction = Annotated[float, Interval(ge=0.0, le=1.0)]
Momentum = Annotated[float, Interval(ge=0.0, lt=1.0)]
FloatPair = tuple[float, float]
PAPER_BLUR_PROBS = (1.0, 0.1, 0.5)  # multi-crop blur (global 1, global 2, local), BYOL Table 6 as cited by DINOv2
STRICT = {"extra": "forbid"}

# The official factories (dinov2_core.models.ARCHS) and their hub constructors (dinov2_core.hub).
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

    __pydantic_config__: ClassVar = STRICT

    arch: str = "vit_small"
    patch_size: PosInt = 14
    img_size: PosInt = 224
    num_register_tokens: NonNegInt = 0
    layerscale: PosFloat | None = 1.0e-5  # LayerScale init; None: no ls1/ls2 parameters
    ffn_layer: Literal["mlp", "swiglu", "swiglufused", "identity"] = "mlp"
    drop_path_rate: Annotated[float, Interval(ge=0.0, lt=1.0)] = 0.0
    drop_path_uniform: bool = True
    interpolate_antialias: bool = False
    interpolate_offset: NonNegFloat = 0.1
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    depth: PosInt | None = None
    embed_dim: PosInt | None = None
    num_heads: PosInt | None = None

    def __post_init__(self) -> None:
        if self.arch not in HUB_NAMES:
            raise ValueError(f"unknown arch {self.arch!r}; choose from {sorted(HUB_NAMES)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be a multiple of num_heads ({self.num_heads})")
        if self.arch == "vit_giant2" and not self.ffn_layer.startswith("swiglu"):
            raise ValueError("vit_giant2 uses a SwiGLU ffn_layer (paper App. B), got " + repr(self.ffn_layer))

    def model_kwargs(self, with_drop_path: bool = True) -> dict[str, Any]:
        """Factory keyword arguments (``dinov2_core.models.build_backbone`` calls the factory). Blocks are never chunked: flat ``blocks.<i>`` keys are the released layout,
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

    __pydantic_config__: ClassVar = STRICT

    n_prototypes: PosInt = 65536
    hidden_dim: PosInt = 2048
    bottleneck_dim: PosInt = 256
    nlayers: PosInt = 3


@dataclass
class LossConfig:
    """Weights and settings of the three objectives (paper Sec. 3) and of the teacher centering."""

    __pydantic_config__: ClassVar = STRICT

    dino_loss_weight: NonNegFloat = 1.0
    koleo_loss_weight: NonNegFloat = 0.1
    ibot_loss_weight: NonNegFloat = 1.0
    ibot_separate_head: bool = True  # paper Sec. 4: untied heads work better at scale
    dino_head: HeadConfig = field(default_factory=HeadConfig)
    ibot_head: HeadConfig = field(default_factory=HeadConfig)
    centering: Literal["sinkhorn_knopp", "centering"] = "sinkhorn_knopp"  # centering: softmax, EMA centre
    sinkhorn_iterations: PosInt = 3  # paper Sec. 3 (SwAV-style SK, 3 iterations)
    student_temp: PosFloat = 0.1
    center_momentum: Momentum = 0.9
    mask_sample_probability: Fraction = 0.5  # iBOT: share of global crops that are masked (App. B)
    mask_ratio_min_max: FloatPair = (0.1, 0.5)

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

    __pydantic_config__: ClassVar = STRICT

    epochs: PosInt = 100
    epoch_length: PosInt = 1250
    base_lr: PosFloat = 0.004  # for a global batch of 1024, scaled by sqrt(batch / 1024)
    min_lr: NonNegFloat = 1.0e-6
    warmup_epochs: NonNegInt = 10
    weight_decay: NonNegFloat = 0.04
    weight_decay_end: NonNegFloat = 0.4
    clip_grad: NonNegFloat = 3.0  # 0: no clipping
    freeze_last_layer_epochs: NonNegInt = 1
    patch_embed_lr_mult: PosFloat = 0.2
    layerwise_decay: Annotated[float, Interval(gt=0.0, le=1.0)] = 0.9
    adamw_beta1: Momentum = 0.9
    adamw_beta2: Momentum = 0.999
    momentum_teacher: Fraction = 0.992
    final_momentum_teacher: Fraction = 1.0
    teacher_temp: PosFloat = 0.07
    warmup_teacher_temp: PosFloat = 0.04
    warmup_teacher_temp_epochs: NonNegInt = 30

    def __post_init__(self) -> None:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be <= epochs ({self.epochs})")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.epoch_length

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DataConfig:
    """The shard stream: ``shards`` is a shard index (``shards.json``, local or any fsspec URL)."""

    __pydantic_config__: ClassVar = STRICT

    shards: str
    global_batch_size: PosInt = 64  # split evenly over all processes
    streams: PosInt = 4  # independent shard streams, split over ranks (a multiple of the world size)
    num_workers: NonNegInt = 0  # DataLoader processes per rank; 0 decodes in the training process
    seed: NonNegInt = 0


@dataclass(frozen=True)
class MultiCropConfig:
    """Paper Sec. 4 / official defaults: 2 global crops of 224 px, 8 local crops of 98 px."""

    __pydantic_config__: ClassVar = STRICT

    global_crops_size: PosInt = 224
    local_crops_size: PosInt = 98
    local_crops_number: NonNegInt = 8
    global_crops_scale: FloatPair = (0.32, 1.0)
    local_crops_scale: FloatPair = (0.05, 0.32)
    # (global 1, global 2, local): the paper follows BYOL (Table 6), 1.0 / 0.1 / 0.5 (dinov2_core.data.augmentations)
    blur_probs: tuple[Fraction, Fraction, Fraction] = PAPER_BLUR_PROBS
    solarize_prob: Fraction = 0.2  # second global crop only (BYOL / DINO)

    def check_patch_multiple(self, patch_size: int) -> None:
        """Crops must tile into whole patches."""
        for name in ("global_crops_size", "local_crops_size"):
            if getattr(self, name) % patch_size:
                raise ValueError(f"crops.{name}: {getattr(self, name)} is not a multiple of the patch size "
                                 f"{patch_size}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the processes compute."""

    __pydantic_config__: ClassVar = STRICT

    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when visible
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    fsdp: Literal["auto", "on"] = "auto"  # auto: FSDP2 only with several processes; on: also with one
    pack_sequences: Literal["auto", "on", "off"] = "auto"  # auto: packed multi-crop stream on GPU only
    timeout_s: PosFloat = 1800.0  # collective operations (a hung rank fails the run instead of waiting forever)
    # torch.compile every transformer block (one shared graph): pays on GPUs (H200, ViT-L/14 SSL step in bf16: 1.27x,
    # benchmarks/results/gpu_check_h200.md), not on CPU; a one-off compile (~11 s for ViT-L on the H200, ~25 s for
    # ViT-S/14 on 2 CPU cores, again for each new crop layout)
    compile: bool = False
    # activation checkpointing of every block that trains: keeps a block's input instead of its activations and
    # recomputes them in backward (what lets a ViT-g or a bigger batch fit on a GPU); the same numbers as without.
    # Default CPU profile: 148 -> 24 MiB kept for backward, a 16 % slower step (`python -m benchmarks.train_step`)
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class MonitorConfig:
    """The k-NN monitor: where the labelled split is and how much of it to use; ``every`` > 0 also runs it during
    training."""

    __pydantic_config__: ClassVar = STRICT

    eval_dir: str | None = None  # train.csv / test.csv with path,label; None: no monitor
    n_train: PosInt = 2000
    n_test: PosInt = 2000
    k: PosInt = 20
    every: NonNegInt = 0  # iterations between checks during training (0: only after the run)


__all__ = ["HUB_NAMES", "STRICT", "BackboneConfig", "DataConfig", "FloatPair", "Fraction", "HeadConfig", "LossConfig",
           "Momentum", "MonitorConfig", "MultiCropConfig", "NonNegFloat", "NonNegInt", "OptimConfig", "PosFloat",
           "PosInt", "RuntimeConfig"]
