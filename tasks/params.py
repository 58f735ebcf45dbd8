"""The one typed, validated view of `params.yaml` (and of any profile file beside it).

Every stage reads its section from here, never from raw YAML, so a typo or an out-of-range value is caught
before any work starts and is reported as one line that names the key and what it expects.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PosInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PosFloat = Annotated[float, Field(gt=0.0)]


class ParamsError(ValueError):
    """A params file or override is wrong; the message is one line naming the key."""


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class StorageParams(Section):
    """Where S3-compatible storage lives. Credentials never live here: they come from the environment."""

    s3_endpoint_url: str | None = None  # None: AWS default, or the AWS_ENDPOINT_URL environment variable
    s3_region: str = "us-east-1"


class DemoDataParams(Section):
    """Sizes of the bundled default data (real Fashion-MNIST items and natural photos, materialised offline)."""

    out: str = "data/demo"
    seed: NonNegInt = 0
    n_in_domain: PosInt = 4000  # Fashion-MNIST train items in the raw crawl
    n_off_domain_photos: NonNegInt = 400  # crops of natural photos shipped with scikit-image/scikit-learn/matplotlib
    n_off_domain_text: NonNegInt = 150  # rendered text/page images (synthetic: no package ships page scans at scale)
    n_exact_duplicates: NonNegInt = 150  # byte-for-byte copies of crawl items
    n_near_duplicates: NonNegInt = 300  # resized / re-encoded / cropped / flipped copies
    n_eval_copies: NonNegInt = 60  # copies of evaluation test images planted in the crawl
    n_seed: PosInt = 500  # curated, labelled in-domain seed images for retrieval
    n_eval_train: PosInt = 2000  # labelled Fashion-MNIST train subset for k-NN / linear probe
    n_eval_test: PosInt = 2000  # Fashion-MNIST test subset
    n_seg_train: PosInt = 300
    n_seg_test: PosInt = 100
    seg_size: Annotated[int, Field(ge=28, le=1024)] = 56
    jpeg_fraction: Fraction = 0.3  # share of in-domain items written as JPEG rather than PNG
    dead_http_urls: NonNegInt = 2  # http:// rows pointing at a closed loopback port (exercise fetch errors)
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"


class IngestParams(Section):
    """Decode-verify limits for the raw crawl (paper §3: the crawl is filtered before any curation)."""

    manifest: str = "data/demo/crawl/manifest.csv"
    out: str = "data/ingest"
    url_column: str = "url"
    workers: Annotated[int, Field(ge=1, le=256)] = 8
    min_side: PosInt = 20
    max_side: PosInt = 8192
    max_pixels: PosInt = 40_000_000  # decompression-bomb guard, checked from the header before decoding
    max_aspect: Annotated[float, Field(ge=1.0)] = 6.0
    max_bytes: PosInt = 50_000_000
    allowed_formats: list[str] = Field(default_factory=lambda: ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
    http_timeout_s: PosFloat = 10.0  # every connect and every read
    http_deadline_s: PosFloat = 120.0  # a whole HTTP response
    http_retries: NonNegInt = 2  # for transient faults only (network, HTTP 429/5xx, S3 throttling)
    retry_backoff_s: Annotated[float, Field(ge=0.0)] = 0.5
    # Above this fraction of rows with transient faults the stage fails (and is retried) instead of
    # succeeding with a smaller dataset; what was fetched waits in resume_dir for the rerun.
    max_transient_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.001
    resume_dir: str | None = "data/cache/ingest-resume"
    max_url_length: Annotated[int, Field(ge=16)] = 4096
    allow_outside_root: bool = False  # local paths must stay under the manifest's folder unless this is set

    @model_validator(mode="after")
    def _sides(self) -> IngestParams:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
        return self


class EmbedderParams(Section):
    """Which embedder a curation stage uses: the model-free copy-detection descriptor (bootstrap round) or a
    DINOv2 backbone from an official-format checkpoint (the project's own exported teacher, or Meta's)."""

    kind: Literal["copy-detection", "dinov2"] = "copy-detection"
    weights: str | None = None  # .pth path or s3:// URL, required for kind=dinov2
    hub: str = "dinov2_vits14"  # hub constructor the weights fit (dinov2_core.hub)
    hub_kwargs: dict[str, Any] = Field(default_factory=dict)  # e.g. {depth: 6, img_size: 56}; a model.json beside the weights wins
    image_size: PosInt = 224
    batch_size: PosInt = 64

    @model_validator(mode="after")
    def _weights(self) -> EmbedderParams:
        if self.kind == "dinov2" and not self.weights:
            raise ValueError("kind 'dinov2' needs weights (an official-format .pth path or s3:// URL)")
        return self


class EvalSetRef(Section):
    """An evaluation image set to decontaminate against: an index CSV with an id and a relative path column."""

    index: str
    path_column: str = "path"
    id_column: str = "id"


class DedupParams(Section):
    """Near-duplicate removal (paper §3 / App. A: k=64 neighbours, connected components, one kept per component)."""

    images: str = "data/ingest"
    out: str = "data/dedup"
    embedder: EmbedderParams = Field(default_factory=EmbedderParams)
    k: PosInt = 64
    threshold: Annotated[float, Field(gt=-1.0, lt=1.0)] = 0.986  # copy-detection descriptor: see params.yaml
    crop_views: bool = True  # also link centre-crop views (our descriptor is not crop invariant, unlike SSCD)
    verify: bool = True  # verify candidate pairs with local features (SIFT + RANSAC), see params.yaml
    verify_k: PosInt = 8  # candidate neighbours per image, whatever their similarity
    verify_min_inliers: PosInt = 4  # RANSAC inliers of a plausible re-upload transform ...
    verify_min_ncc: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.9  # ... and aligned-pixel correlation: a copy
    exact_search_max: PosInt = 50_000  # exact faiss search up to this many images, IVF above
    nlist: PosInt | None = None
    nprobe: PosInt = 32
    check_sample: PosInt = 1000  # kept images re-searched by the GX boundary check
    cache_dir: str | None = "data/cache/embeddings"
    ground_truth: str | None = "data/demo/ground_truth.parquet"  # demo sidecar: metrics only, never decisions


class DecontaminateParams(Section):
    """Removal of near-copies of evaluation images (paper §3); whole dedup components go."""

    dedup: str = "data/dedup"
    images: str = "data/ingest"
    out: str = "data/decontaminate"
    eval_sets: list[EvalSetRef] = Field(default_factory=lambda: [
        EvalSetRef(index="data/demo/eval/classification/test.csv"),
        EvalSetRef(index="data/demo/eval/segmentation/test.csv", path_column="image"),
    ])
    threshold: Annotated[float, Field(gt=-1.0, lt=1.0)] = 0.9625
    k: PosInt = 64
    crop_views: bool = True
    verify: bool = True  # also remove verified copies below the threshold (dedup's verify_* settings)
    cache_dir: str | None = "data/cache/embeddings"
    ground_truth: str | None = "data/demo/ground_truth.parquet"


class RetrieveParams(Section):
    """Seed-based curation (LVD-142M, paper §3): sample-based kNN for large seed sets, cluster-based for small."""

    pool: str = "data/decontaminate"
    images: str = "data/ingest"
    seed_index: str = "data/demo/seed/seed.csv"
    seed_path_column: str = "path"
    seed_id_column: str = "id"
    out: str = "data/retrieve"
    embedder: EmbedderParams = Field(default_factory=EmbedderParams)
    mode: Literal["auto", "sample", "cluster"] = "auto"
    large_seed_set: PosInt = 1_000_000  # auto: sample-based at or above this many seeds, cluster-based below
    k: PosInt = 4  # paper: 4 nearest pool images per seed image (32 for some sets)
    n_clusters: PosInt = 64
    per_cluster: PosInt = 10_000  # paper App. A: up to 10k images sampled per retained cluster
    seed: NonNegInt = 0
    cache_dir: str | None = "data/cache/embeddings"
    ground_truth: str | None = "data/demo/ground_truth.parquet"


class EvalBackboneRef(Section):
    """A backbone to evaluate: an official-format .pth (local or s3://), rebuilt via its model.json or `hub`."""

    name: str
    weights: str
    hub: str = "dinov2_vits14"
    hub_kwargs: dict[str, Any] = Field(default_factory=dict)
    crop_size: PosInt | None = None  # None: eval.crop_size


class EvalParams(Section):
    """Frozen-feature evaluation (paper §7): k-NN, linear probe, linear segmentation, with baselines."""

    backbones: list[EvalBackboneRef] = Field(default_factory=list)
    classification: str = "data/demo/eval/classification"  # train.csv / test.csv: id, path, label
    segmentation: str = "data/demo/eval/segmentation"  # train.csv / test.csv: id, image, mask
    resize_size: PosInt = 64
    crop_size: PosInt = 56
    batch_size: PosInt = 128
    knn_ks: list[PosInt] = Field(default_factory=lambda: [10, 20, 100, 200])  # official protocol
    knn_temperature: PosFloat = 0.07
    linear_lrs: list[PosFloat] = Field(default_factory=lambda: [1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5])
    linear_epochs: PosInt = 10
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)] = 0.1
    seg_epochs: PosInt = 20
    seg_lr: PosFloat = 1e-3
    baselines: list[Literal["random-init", "raw-pixels"]] = Field(
        default_factory=lambda: ["random-init", "raw-pixels"])
    n_figure_images: PosInt = 6
    cache_dir: str | None = "data/cache/features"
    seed: NonNegInt = 0
    out: str = "data/eval"


class ShardsParams(Section):
    """WebDataset shards of the curated set, to a local folder or an s3:// prefix."""

    curated: str = "data/retrieve/curated.parquet"
    images: str = "data/ingest"  # the ingest store: manifest.parquet + images/
    out: str = "data/shards"  # local folder or s3://bucket/prefix
    index_copy: str = "data/shards/shards.json"  # local copy of the index when `out` is remote
    target_samples: PosInt = 1000
    target_bytes: PosInt = 64_000_000
    seed: NonNegInt = 0
    verify_decode_fraction: Fraction = 1.0  # share of samples decoded in the read-back check


# ---------------------------------------------------------------------------------------------- training (issue 5)
FloatPair = Annotated[list[float], Field(min_length=2, max_length=2)]


class ModelParams(Section):
    """A backbone: official factory name + keyword arguments (the hub constructors take the same ones)."""

    arch: Literal["vit_small", "vit_base", "vit_large", "vit_giant2"] = "vit_small"
    patch_size: PosInt = 14
    depth: PosInt | None = None  # None: the factory's (12 for vit_small); small CPU models override
    embed_dim: PosInt | None = None
    num_heads: PosInt | None = None
    num_register_tokens: NonNegInt = 0
    layerscale: PosFloat | None = 1.0e-5  # LayerScale init (official default); None: no ls1/ls2 parameters
    ffn_layer: Literal["mlp", "swiglufused"] = "mlp"
    drop_path_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    drop_path_uniform: bool = True
    interpolate_antialias: bool = False
    interpolate_offset: Annotated[float, Field(ge=0.0)] = 0.1

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelParams:
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be a multiple of num_heads ({self.num_heads})")
        if self.arch == "vit_giant2" and self.ffn_layer != "swiglufused":
            raise ValueError("vit_giant2 uses ffn_layer 'swiglufused' (paper App. B)")
        return self


class HeadParams(Section):
    """A DINO / iBOT projection head (official: 3 layers, 2048 hidden, 256 bottleneck, 65536 prototypes)."""

    n_prototypes: PosInt = 65536
    hidden_dim: PosInt = 2048
    bottleneck_dim: PosInt = 256
    nlayers: PosInt = 3


class LossParams(Section):
    """The three objectives (paper Sec. 3) and the teacher centering."""

    dino_loss_weight: Annotated[float, Field(ge=0.0)] = 1.0
    koleo_loss_weight: Annotated[float, Field(ge=0.0)] = 0.1
    ibot_loss_weight: Annotated[float, Field(ge=0.0)] = 1.0
    ibot_separate_head: bool = True
    dino_head: HeadParams = Field(default_factory=HeadParams)
    ibot_head: HeadParams = Field(default_factory=HeadParams)
    centering: Literal["sinkhorn_knopp", "centering"] = "sinkhorn_knopp"
    mask_sample_probability: Fraction = 0.5
    mask_ratio_min_max: FloatPair = Field(default_factory=lambda: [0.1, 0.5])


class CropsParams(Section):
    """Multi-crop (paper: 2 global crops of 224 px, 8 local crops of 98 px); sizes must be patch multiples."""

    global_crops_size: PosInt = 224
    local_crops_size: PosInt = 98
    local_crops_number: NonNegInt = 8
    global_crops_scale: FloatPair = Field(default_factory=lambda: [0.32, 1.0])
    local_crops_scale: FloatPair = Field(default_factory=lambda: [0.05, 0.32])


class OptimParams(Section):
    """AdamW and the cosine schedules; lengths in 'epochs' of `epoch_length` iterations (official convention)."""

    epochs: PosInt = 100
    epoch_length: PosInt = 1250
    base_lr: PosFloat = 0.004  # for a global batch of 1024; scaled by sqrt(batch / 1024)
    min_lr: Annotated[float, Field(ge=0.0)] = 1.0e-6
    warmup_epochs: NonNegInt = 10
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.04
    weight_decay_end: Annotated[float, Field(ge=0.0)] = 0.4
    clip_grad: Annotated[float, Field(ge=0.0)] = 3.0  # 0: no clipping
    freeze_last_layer_epochs: NonNegInt = 1
    patch_embed_lr_mult: PosFloat = 0.2
    layerwise_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    adamw_beta1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    adamw_beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    momentum_teacher: Fraction = 0.992
    final_momentum_teacher: Fraction = 1.0
    teacher_temp: PosFloat = 0.07
    warmup_teacher_temp: PosFloat = 0.04
    warmup_teacher_temp_epochs: NonNegInt = 30

    @model_validator(mode="after")
    def _lengths(self) -> OptimParams:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be <= epochs ({self.epochs})")
        return self


class TrainDataParams(Section):
    """WebDataset shards (index written by the shards stage; local or s3://) and how they are batched."""

    shards: str = "data/shards/shards.json"
    global_batch_size: PosInt = 64  # split evenly over all processes
    streams: PosInt = 4  # parallel shard streams; a multiple of the world size that divides the batch
    num_workers: NonNegInt = 2  # DataLoader decode/augment processes per training process
    seed: NonNegInt = 0


class CheckpointParams(Section):
    every: NonNegInt = 50  # iterations between checkpoints (0: only the final one)
    keep: PosInt = 2
    # None: <out>/run/checkpoints. Multi-node: a folder every node sees, or an s3:// URL (endpoint from `storage`,
    # keys from the environment), so a restarted job resumes without a shared filesystem.
    dir: str | None = None


class KnnMonitorParams(Section):
    """A quick k-NN check of the exported backbone vs a random-init one (DESIGN.md Sec. 6); null eval_dir: skip."""

    eval_dir: str | None = "data/demo/eval/classification"  # train.csv / test.csv with path,label
    n_train: PosInt = 2000
    n_test: PosInt = 2000
    k: PosInt = 20
    every: NonNegInt = 0  # also during training, every N iterations (0: only after the run)


class LaunchParams(Section):
    """How the training stages start their torchrun workers (one node by default; no SLURM)."""

    nproc_per_node: PosInt = 1
    nnodes: PosInt = 1
    node_rank: NonNegInt = 0
    master_addr: str = "127.0.0.1"
    master_port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0 with one node: a free port (torchrun --standalone)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    omp_threads: NonNegInt = 0  # per process; 0: cores / processes
    pack_sequences: Literal["auto", "on", "off"] = "auto"  # auto: packed multi-crop stream on GPU only
    fsdp: Literal["auto", "on"] = "auto"  # auto: FSDP2 only with several processes; on: also with one
    timeout_s: PosFloat = 1800.0

    @model_validator(mode="after")
    def _multinode(self) -> LaunchParams:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank ({self.node_rank}) must be < nnodes ({self.nnodes})")
        if self.nnodes > 1 and self.master_port == 0:
            raise ValueError("several nodes need an explicit master_port")
        return self


def _check_crops(crops: CropsParams, patch_size: int) -> None:
    for name in ("global_crops_size", "local_crops_size"):
        if getattr(crops, name) % patch_size:
            raise ValueError(f"crops.{name} ({getattr(crops, name)}) must be a multiple of the patch size {patch_size}")


class PretrainParams(Section):
    """Self-supervised pre-training (paper Sec. 3-4): DINO + iBOT + KoLeo, EMA teacher, FSDP via torchrun."""

    out: str = "data/pretrain"
    data: TrainDataParams = Field(default_factory=TrainDataParams)
    crops: CropsParams = Field(default_factory=lambda: CropsParams(global_crops_size=56, local_crops_size=28,
                                                                    local_crops_number=4))
    loss: LossParams = Field(default_factory=LossParams)
    optim: OptimParams = Field(default_factory=OptimParams)
    checkpoint: CheckpointParams = Field(default_factory=CheckpointParams)
    monitor: KnnMonitorParams = Field(default_factory=KnnMonitorParams)


class AdaptParams(Section):
    """Short high-resolution phase at the end of pre-training (paper Sec. 4: 518 px, ~10k iterations)."""

    init: str = "data/pretrain/export/full.pth"  # the pre-training's full checkpoint (student, teacher, heads)
    out: str = "data/adapt"
    data: TrainDataParams = Field(default_factory=TrainDataParams)
    crops: CropsParams = Field(default_factory=lambda: CropsParams(global_crops_size=126, local_crops_size=56,
                                                                    local_crops_number=4))
    optim: OptimParams = Field(default_factory=OptimParams)
    checkpoint: CheckpointParams = Field(default_factory=CheckpointParams)
    monitor: KnnMonitorParams = Field(default_factory=KnnMonitorParams)


class DistillParams(Section):
    """A frozen big teacher distilled into a smaller student (paper Sec. 5); the student's EMA is the result."""

    teacher: str = "data/adapt/export/full.pth"  # a full checkpoint (with heads) or an official-format backbone .pth
    teacher_model: ModelParams | None = None  # needed only for a bare backbone .pth (full checkpoints carry it)
    student: ModelParams = Field(default_factory=ModelParams)
    out: str = "data/distill"
    data: TrainDataParams = Field(default_factory=TrainDataParams)
    crops: CropsParams = Field(default_factory=lambda: CropsParams(global_crops_size=56, local_crops_size=28,
                                                                    local_crops_number=4))
    loss: LossParams = Field(default_factory=LossParams)
    optim: OptimParams = Field(default_factory=OptimParams)
    checkpoint: CheckpointParams = Field(default_factory=CheckpointParams)
    monitor: KnnMonitorParams = Field(default_factory=KnnMonitorParams)

    @model_validator(mode="after")
    def _crops(self) -> DistillParams:
        _check_crops(self.crops, self.student.patch_size)
        return self


class Params(Section):
    """The whole params file. Add a section here when a stage is added."""

    profile: Literal["tiny-cpu", "quality-cpu", "paper"] = "tiny-cpu"
    seed: NonNegInt = 0
    reports: str = "reports"
    storage: StorageParams = Field(default_factory=StorageParams)
    demo_data: DemoDataParams = Field(default_factory=DemoDataParams)
    ingest: IngestParams = Field(default_factory=IngestParams)
    dedup: DedupParams = Field(default_factory=DedupParams)
    decontaminate: DecontaminateParams = Field(default_factory=DecontaminateParams)
    retrieve: RetrieveParams = Field(default_factory=RetrieveParams)
    eval: EvalParams = Field(default_factory=EvalParams)
    shards: ShardsParams = Field(default_factory=ShardsParams)
    model: ModelParams = Field(default_factory=ModelParams)
    launch: LaunchParams = Field(default_factory=LaunchParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    adapt: AdaptParams = Field(default_factory=AdaptParams)
    distill: DistillParams = Field(default_factory=DistillParams)


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{key}' (check the spelling; known keys are in tasks/params.py)"
    got = first.get("input")
    got_s = repr(got) if not isinstance(got, dict) else "a mapping"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {first['msg']}, got {got_s}{more}"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {dotted}: '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key.sub, YAML-typed value), so `--set ingest.workers=4` gives an int."""
    if "=" not in text:
        raise ParamsError(f"override '{text}': expected KEY=VALUE, e.g. ingest.workers=4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ParamsError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` on ``base``: mappings merge key by key, anything else (lists included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_params_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A params file as a plain tree. A profile may start with ``extends: <file>`` (relative to itself) and state
    only what differs: the official configs' "defaults once, experiments as overlays"."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found (run from the project root or pass --params)")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    base = tree.pop("extends", None)
    if base is None:
        return tree
    base_path = (path.parent / str(base)).resolve()
    if base_path in _seen or base_path == path.resolve():
        raise ParamsError(f"{path}: 'extends: {base}' makes a cycle")
    return _merge(read_params_tree(base_path, (*_seen, path.resolve())), tree)


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read (resolving ``extends``), merge overrides into, and validate a params file. Raises ParamsError with one
    line."""
    tree = read_params_tree(path)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ParamsError(_format_error(str(path), err)) from None


def params_record(section: BaseModel) -> dict[str, Any]:
    """Plain-JSON view of a section, for metrics files that say what a stage ran with."""
    return section.model_dump(mode="json")
