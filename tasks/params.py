"""The one typed, validated view of `params.yaml` (and of any profile file beside it).

Every stage reads its section from here, never from raw YAML, so a typo or an out-of-range value is caught
before any work starts and is reported as one line that names the key and what it expects.

Each value is defined once. The pipeline's own settings (paths, curation, evaluation, launching) have no defaults
in code: `params.yaml` is where they live and what DVC tracks. The training settings are the library's config
dataclasses with the official defaults; `params.yaml` states only what this profile changes, and the other profiles
are overlays (`extends: params.yaml`) that state only what they change (tests/test_params.py checks all of it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_serializer,
    model_validator,
)

from dinov2_core.config import (
    BackboneConfig,
    DataConfig,
    Fraction,
    LossConfig,
    MonitorConfig,
    MultiCropConfig,
    NonNegInt,
    OptimConfig,
    PosFloat,
    PosInt,
    RuntimeConfig,
)


class ParamsError(ValueError):
    """A params file or override is wrong; the message is one line naming the key."""


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class StorageParams(Section):
    """Where S3-compatible storage lives. Credentials never live here: they come from the environment."""

    s3_endpoint_url: str | None  # None: AWS default, or the AWS_ENDPOINT_URL environment variable
    s3_region: str


class DemoDataParams(Section):
    """Sizes of the bundled default data (real Fashion-MNIST items and natural photos, materialised offline)."""

    out: str
    seed: NonNegInt
    n_in_domain: PosInt  # Fashion-MNIST train items in the raw crawl
    n_off_domain_photos: NonNegInt  # crops of natural photos shipped with scikit-image/scikit-learn/matplotlib
    n_off_domain_text: NonNegInt  # rendered text/page images (synthetic: no package ships page scans at scale)
    n_exact_duplicates: NonNegInt  # byte-for-byte copies of crawl items
    n_near_duplicates: NonNegInt  # resized / re-encoded / cropped / flipped copies
    n_eval_copies: NonNegInt  # copies of evaluation test images planted in the crawl
    n_seed: PosInt  # curated, labelled in-domain seed images for retrieval
    n_eval_train: PosInt  # labelled Fashion-MNIST train subset for k-NN / linear probe
    n_eval_test: PosInt  # Fashion-MNIST test subset
    n_seg_train: PosInt
    n_seg_test: PosInt
    seg_size: Annotated[int, Field(ge=28, le=1024)]
    jpeg_fraction: Fraction  # share of in-domain items written as JPEG rather than PNG
    dead_http_urls: NonNegInt  # http:// rows pointing at a closed loopback port (exercise fetch errors)
    fashion_mnist_dir: str


class IngestParams(Section):
    """Decode-verify limits for the raw crawl (paper §3: the crawl is filtered before any curation)."""

    manifest: str
    out: str
    url_column: str
    workers: Annotated[int, Field(ge=1, le=256)]
    min_side: PosInt
    max_side: PosInt
    max_pixels: PosInt  # decompression-bomb guard, checked from the header before decoding
    max_aspect: Annotated[float, Field(ge=1.0)]
    max_bytes: PosInt
    allowed_formats: list[str]
    http_timeout_s: PosFloat  # every connect and every read
    http_deadline_s: PosFloat  # a whole HTTP response
    http_retries: NonNegInt  # for transient faults only (network, HTTP 429/5xx, S3 throttling)
    retry_backoff_s: Annotated[float, Field(ge=0.0)]
    # Above this fraction of rows with transient faults the stage fails (and is retried) instead of
    # succeeding with a smaller dataset; what was fetched waits in resume_dir for the rerun.
    max_transient_fraction: Annotated[float, Field(ge=0.0, le=1.0)]
    resume_dir: str | None
    max_url_length: Annotated[int, Field(ge=16)]
    allow_outside_root: bool  # local paths must stay under the manifest's folder unless this is set

    @model_validator(mode="after")
    def _sides(self) -> IngestParams:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
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

    @model_validator(mode="after")
    def _weights(self) -> EmbedderParams:
        if self.kind == "dinov2" and not self.weights:
            raise ValueError("kind 'dinov2' needs weights (an official-format .pth path or s3:// URL)")
        return self


class EvalSetRef(Section):
    """An evaluation image set to decontaminate against: an index CSV with an id and a relative path column."""

    index: str
    # A list entry states only what it needs: the defaults below are the only place these values live.
    path_column: str = "path"
    id_column: str = "id"


class DedupParams(Section):
    """Near-duplicate removal (paper §3 / App. A: k=64 neighbours, connected components, one kept per component)."""

    images: str
    out: str
    embedder: EmbedderParams
    k: PosInt
    threshold: Annotated[float, Field(gt=-1.0, lt=1.0)]  # copy-detection descriptor: see params.yaml
    crop_views: bool  # also link centre-crop views (our descriptor is not crop invariant, unlike SSCD)
    verify: bool  # verify candidate pairs with local features (SIFT + RANSAC), see params.yaml
    verify_k: PosInt  # candidate neighbours per image, whatever their similarity
    verify_min_inliers: PosInt  # RANSAC inliers of a plausible re-upload transform ...
    verify_min_ncc: Annotated[float, Field(ge=-1.0, le=1.0)]  # ... and aligned-pixel correlation: a copy
    verify_min_dense: Annotated[float, Field(ge=-1.0, le=1.0)] | None  # or dense alignment + detail correlation
    exact_search_max: PosInt  # exact faiss search up to this many images, IVF above
    nlist: PosInt | None
    nprobe: PosInt
    check_sample: PosInt  # kept images re-searched by the GX boundary check
    cache_dir: str | None
    ground_truth: str | None  # demo sidecar: metrics only, never decisions


class DecontaminateParams(Section):
    """Removal of near-copies of evaluation images (paper §3); whole dedup components go."""

    dedup: str
    images: str
    out: str
    eval_sets: list[EvalSetRef]
    threshold: Annotated[float, Field(gt=-1.0, lt=1.0)]
    k: PosInt
    crop_views: bool
    verify: bool  # also remove verified copies below the threshold (dedup's verify_* settings)
    cache_dir: str | None
    ground_truth: str | None


class RetrieveParams(Section):
    """Seed-based curation (LVD-142M, paper §3): sample-based kNN for large seed sets, cluster-based for small;
    balanced sampling over hierarchical k-means when the seed set is empty (no curated data to start from)."""

    pool: str
    images: str
    seed_index: str
    seed_path_column: str
    seed_id_column: str
    out: str
    embedder: EmbedderParams
    mode: Literal["auto", "sample", "cluster", "balanced"]
    large_seed_set: PosInt  # auto: sample-based at or above this many seeds, cluster-based below, balanced at 0
    balanced_fraction: Annotated[float, Field(gt=0.0, le=1.0)]  # balanced: share of the pool kept
    k: PosInt  # paper: 4 nearest pool images per seed image (32 for some sets)
    n_clusters: PosInt
    per_cluster: PosInt  # paper App. A: up to 10k images sampled per retained cluster
    seed: NonNegInt
    cache_dir: str | None
    ground_truth: str | None


class EvalBackboneRef(Section):
    """A backbone to evaluate: an official-format .pth (local or s3://), rebuilt via its model.json or `hub`."""

    name: str
    weights: str
    # A list entry states only what it needs: the defaults below are the only place these values live.
    hub: str = "dinov2_vits14"  # used when no model.json lies beside the weights
    hub_kwargs: dict[str, Any] = Field(default_factory=dict)
    crop_size: PosInt | None = None  # None: eval.crop_size


class EvalParams(Section):
    """Frozen-feature evaluation (paper §7): k-NN, linear probe, linear segmentation, with baselines."""

    backbones: list[EvalBackboneRef]
    classification: str  # train.csv / test.csv: id, path, label
    segmentation: str  # train.csv / test.csv: id, image, mask (+ classes.txt); a folder without them: no seg probe
    resize_size: PosInt
    crop_size: PosInt
    batch_size: PosInt
    knn_ks: list[PosInt]  # official protocol: 10, 20, 100, 200
    knn_temperature: PosFloat
    linear_lrs: list[PosFloat]
    linear_epochs: PosInt
    val_fraction: Annotated[float, Field(gt=0.0, lt=0.5)]
    seg_epochs: PosInt
    seg_lr: PosFloat
    baselines: list[Literal["random-init", "raw-pixels"]]
    n_figure_images: PosInt
    cache_dir: str | None
    seed: NonNegInt
    out: str


class ShardsParams(Section):
    """WebDataset shards of the curated set, to a local folder or an s3:// prefix."""

    curated: str
    images: str  # the ingest store: manifest.parquet + images/
    out: str  # local folder or s3://bucket/prefix
    index_copy: str  # local copy of the index when `out` is remote
    target_samples: PosInt
    target_bytes: PosInt
    seed: NonNegInt
    verify_decode_fraction: Fraction  # share of samples decoded in the read-back check


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


class _TrainingStage(Section):
    """What every training stage has: data, crops, optimisation, checkpoints, the k-NN monitor, an output."""

    out: str
    data: DataConfig
    crops: MultiCropConfig = Field(default_factory=MultiCropConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointParams
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)


class PretrainParams(_TrainingStage):
    """Self-supervised pre-training (paper Sec. 3-4): DINO + iBOT + KoLeo, EMA teacher, FSDP via torchrun."""

    loss: LossConfig = Field(default_factory=LossConfig)


class AdaptParams(_TrainingStage):
    """Short high-resolution phase at the end of pre-training (paper Sec. 4: 518 px, ~10k iterations)."""

    init: str  # the pre-training's full checkpoint (student, teacher, heads)


class DistillParams(_TrainingStage):
    """A frozen big teacher distilled into a smaller student (paper Sec. 5); the student's EMA is the result."""

    teacher: str  # a full checkpoint (with heads) or an official-format backbone .pth
    teacher_model: BackboneConfig | None  # needed only for a bare backbone .pth (full checkpoints carry it)
    student: BackboneConfig = Field(default_factory=BackboneConfig)
    loss: LossConfig = Field(default_factory=LossConfig)

    @model_validator(mode="after")
    def _crops(self) -> DistillParams:
        self.crops.check_patch_multiple(self.student.patch_size)
        return self

    @field_serializer("student", "teacher_model")
    def _no_img_size(self, cfg: BackboneConfig | None) -> dict[str, Any] | None:
        return _backbone_params(cfg)


# A backbone's img_size is the global crop size of the stage that trains it, never a param of its own: params
# refuse it and leave it out when they are written back (a stage's run params, `dinov2-pipeline params`).
_STAGE_SETS_IMG_SIZE = (("model",), ("distill", "student"), ("distill", "teacher_model"))


def _backbone_params(cfg: BackboneConfig | None) -> dict[str, Any] | None:
    return None if cfg is None else {k: v for k, v in cfg.as_dict().items() if k != "img_size"}


class Params(Section):
    """The whole params file. Add a section here when a stage is added."""

    profile: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$")]  # a name: tiny-cpu, quality-cpu, paper, yours
    seed: NonNegInt
    reports: str
    storage: StorageParams
    demo_data: DemoDataParams
    ingest: IngestParams
    dedup: DedupParams
    decontaminate: DecontaminateParams
    retrieve: RetrieveParams
    eval: EvalParams
    shards: ShardsParams
    model: BackboneConfig = Field(default_factory=BackboneConfig)
    launch: LaunchParams
    pretrain: PretrainParams
    adapt: AdaptParams
    distill: DistillParams

    @field_serializer("model")
    def _no_img_size(self, cfg: BackboneConfig) -> dict[str, Any] | None:
        return _backbone_params(cfg)

    @model_validator(mode="before")
    @classmethod
    def _img_size_is_derived(cls, tree: Any) -> Any:
        for path in _STAGE_SETS_IMG_SIZE:
            node = tree
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict) and "img_size" in node:
                raise ValueError(f"{'.'.join(path)}.img_size: set by each stage from its crops.global_crops_size; "
                                 f"remove it")
        return tree


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{key}' (check the spelling; known keys: tasks/params.py, dinov2_core/config.py)"
    if kind == "missing":
        return (f"{source}: missing key '{key}' (params.yaml states every pipeline setting; a profile starts with "
                f"'extends: params.yaml' and states only what differs)")
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


DEFAULT_PROFILE = Path(__file__).resolve().parents[1] / "params.yaml"


def default_params() -> Params:
    """The project's default profile (`params.yaml` beside this package): where the pipeline's defaults live."""
    return load_params(DEFAULT_PROFILE)


def params_record(section: Any) -> dict[str, Any]:
    """Plain-JSON view of a section (or of a library config in it), for metrics files that say what a stage ran
    with."""
    return TypeAdapter(type(section)).dump_python(section, mode="json")
