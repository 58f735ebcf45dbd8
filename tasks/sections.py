"""The parts of params that several stages share: the `Section` base, storage, the curation embedder, how training
stages launch and checkpoint, and what every training stage has.

Each stage's own section lives beside its registry entry (`tasks/stages.py`); `tasks/params.py` composes them all
into `Params` and loads files into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dinov2_core.config import (
    BackboneConfig,
    DataConfig,
    MonitorConfig,
    MultiCropConfig,
    NonNegInt,
    OptimConfig,
    PosInt,
    RuntimeConfig,
)


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, and so is an empty string (`-S shards.out=` would
    write into the project's root); values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, str_min_length=1)


class StorageParams(Section):
    """Where S3-compatible storage lives. Credentials never live here: they come from the environment."""

    s3_endpoint_url: str | None  # None: AWS default, or the AWS_ENDPOINT_URL environment variable
    s3_region: str


class TrackingParams(Section):
    """Experiment trackers besides DVCLive (always on: its files are DVC metrics and plots of the training and eval
    stages, so `dvc exp show` / `dvc plots diff` compare runs)."""

    tensorboard_dir: str | None  # TensorBoard event files, one folder per stage; None: off


class LoopParams(Section):
    """The curation loop (tasks/loop.py): rounds after the first, each curated with an earlier round's export."""

    out: str  # round N's outputs go to <out>/round-N/{retrieve,shards,pretrain,eval}
    # round name -> the export folder whose teacher curates it, e.g. {round-2: data/pretrain/export}; {}: no loop
    rounds: dict[Annotated[str, Field(pattern=r"^round-[1-9][0-9]*$")], str]

    @model_validator(mode="after")
    def _consecutive(self) -> LoopParams:
        numbers = [int(name.split("-")[1]) for name in self.rounds]
        if numbers != list(range(2, 2 + len(numbers))):
            raise ValueError(f"rounds must be round-2, round-3, ... in order (round 1 is the pipeline itself), "
                             f"got {', '.join(self.rounds)}")
        return self


class EmbedderParams(Section):
    """Which embedder a curation stage uses: the model-free copy-detection descriptor (bootstrap round) or a
    DINOv2 backbone from an official-format checkpoint (the project's own exported teacher, or Meta's)."""

    kind: Literal["copy-detection", "dinov2"]
    weights: str | None  # .pth path or s3:// URL, required for kind=dinov2
    hub: str  # hub constructor the weights fit (dinov2_core.hub)
    hub_kwargs: dict[str, Any]  # e.g. {depth: 6, img_size: 56}; a model.json beside the weights wins
    image_size: PosInt
    batch_size: PosInt
    processes: PosInt  # above 1: torchrun ranks embed disjoint slices of the pool (tasks/embed_job.py)
    slice_size: PosInt  # keys per slice: the unit a rerun after a killed rank redoes

    @model_validator(mode="after")
    def _weights(self) -> EmbedderParams:
        if self.kind == "dinov2" and not self.weights:
            raise ValueError("kind 'dinov2' needs weights (an official-format .pth path or s3:// URL)")
        return self


# ---------------------------------------------------------------------------------------------- training
# The model, loss, optimisation, crop, data, monitor and runtime settings are the library's own config dataclasses
# (dinov2_core/config.py): their fields and official defaults are stated there once, with their constraints, and
# pydantic validates params into them; params.yaml states only what the profile changes. Only what the pipeline
# adds (how torchrun starts, where checkpoints go) is defined here.



@dataclass(frozen=True, kw_only=True)
class LaunchParams(RuntimeConfig):
    """How the training stages start their torchrun workers (one node by default; no SLURM), on top of the
    library's runtime settings (device, precision, FSDP, packing, timeout)."""

    nproc_per_node: PosInt
    nnodes: PosInt
    node_rank: NonNegInt
    master_addr: str
    master_port: Annotated[int, Field(ge=0, le=65535)]  # 0 with one node: a free port (torchrun --standalone)
    omp_threads: NonNegInt  # per process; 0: cores / processes

    def __post_init__(self) -> None:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank ({self.node_rank}) must be < nnodes ({self.nnodes})")
        if self.nnodes > 1 and self.master_port == 0:
            raise ValueError("several nodes need an explicit master_port")


class CheckpointParams(Section):
    """How often a training stage saves a resumable checkpoint, how many it keeps, and where."""

    every: NonNegInt  # iterations between checkpoints (0: only the final one)
    keep: PosInt
    # None: <out>/run/checkpoints. Multi-node: a folder every node sees, or an s3:// URL (endpoint from `storage`,
    # keys from the environment), so a restarted job resumes without a shared filesystem.
    dir: str | None


class TrainingStageParams(Section):
    """What every training stage has: data, crops, optimisation, checkpoints, the k-NN monitor, an output."""

    out: str
    data: DataConfig
    crops: MultiCropConfig = Field(default_factory=MultiCropConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointParams
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)


# A backbone's img_size is the global crop size of the stage that trains it, never a param of its own: params
# refuse it and leave it out when they are written back (a stage's run params, `dinov2-pipeline params`).
STAGE_SETS_IMG_SIZE = (("model",), ("distill", "student"), ("distill", "teacher_model"))


def backbone_params(cfg: BackboneConfig | None) -> dict[str, Any] | None:
    return None if cfg is None else {k: v for k, v in cfg.as_dict().items() if k != "img_size"}
