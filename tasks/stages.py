"""The stage list, stated once: each stage's params section (types and constraints), the plain function that runs
it, and the data it reads and writes.

The CLI, the Prefect flow, the training worker, `Params` (tasks/params.py) and `dvc.yaml` all come from this list;
`dvc.yaml` is rendered from it (`dinov2-pipeline dvc-yaml`, checked in CI), with each stage's code deps and params
sections derived from what its module imports and reads (`tasks/dvc_yaml.py`), so only the data paths are written
here. Adding a stage is its module, its section's values in `params.yaml`, and a section + `Stage(...)` here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_serializer, model_validator

from dinov2_core.config import BackboneConfig, Fraction, LossConfig, NonNegInt, PosFloat, PosInt
from tasks.sections import EmbedderParams, Section, TrainingStageParams, backbone_params

if TYPE_CHECKING:
    from tasks.params import Params

@dataclass(frozen=True)
class DvcPath:
    """One data path of a stage in `dvc.yaml` (interpolated from params: `${section.key}`), with DVC's options."""

    path: str
    note: str = ""  # a comment written beside it in dvc.yaml
    options: dict[str, Any] = field(default_factory=dict)  # cache / persist / x / y / template


def _paths(items: tuple[str | DvcPath, ...]) -> tuple[DvcPath, ...]:
    return tuple(p if isinstance(p, DvcPath) else DvcPath(p) for p in items)


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function", imported only when the stage runs (keeps the CLI fast)
    summary: str
    deps: tuple[DvcPath, ...] = ()
    outs: tuple[DvcPath, ...] = ()
    plots: tuple[DvcPath, ...] = ()
    params: type[Section] = field(kw_only=True)  # its section of params.yaml, keyed by the name (`-` -> `_`)
    trains: bool = False  # runs torchrun workers: its module has build_spec(params) for tasks/train_worker.py
    tracked: bool = False  # logs to DVCLive (tasks/tracking.py): its metrics.json is a metric of the stage too

    def __post_init__(self) -> None:
        for name in ("deps", "outs", "plots"):
            object.__setattr__(self, name, _paths(getattr(self, name)))

    @property
    def section(self) -> str:
        return self.name.replace("-", "_")

    @property
    def module(self) -> str:
        return self.target.split(":")[0]

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every stage writes its numbers to `${reports}/metrics/<stage>.json` (`tasks.reports.write_metrics`), a
        tracked one also DVCLive's summary; never cached, so `dvc metrics` and `dvc exp show` read the workspace."""
        live = (f"${{reports}}/dvclive/{self.name}/metrics.json",) if self.tracked else ()
        return (f"${{reports}}/metrics/{self.name}.json", *live)

    def load(self) -> Callable[[Params], Any]:
        module, func = self.target.split(":")
        return getattr(importlib.import_module(module), func)


# ------------------------------------------------------------------------------- each stage's params section


class DemoDataParams(Section):
    """Sizes of the bundled default data (real Fashion-MNIST items and natural photos, materialised offline)."""

    out: str
    seed: NonNegInt
    n_in_domain: PosInt  # Fashion-MNIST train items in the raw crawl
    n_off_domain_photos: NonNegInt  # crops of natural photos shipped with scikit-image/scikit-learn/matplotlib
    n_off_domain_text: NonNegInt  # rendered text/page images (synthetic: no package ships page scans at scale)
    n_near_domain: NonNegInt  # digits and grey photo thumbnails in Fashion-MNIST's format (off-domain, look-alike)
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
    parts: PosInt  # above 1: the rows split into that many parts, one torchrun rank each (tasks/ingest_parts.py)
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
    index_factory: str | None  # any faiss index, e.g. "IVF{nlist},PQ32" (IVF-PQ); None: flat / IVF-Flat as above
    index_shards: PosInt  # the database split over this many indexes searched together (IndexShards)
    nlist: PosInt | None
    nprobe: PosInt
    check_sample: PosInt  # kept images re-searched by the GX boundary check
    cache_dir: str | None
    ground_truth: str | None  # demo sidecar: metrics only, never decisions


class EvalSetRef(Section):
    """An evaluation image set to decontaminate against: an index CSV with an id and a relative path column."""

    index: str
    # A list entry states only what it needs: the defaults below are the only place these values live.
    path_column: str = "path"
    id_column: str = "id"


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


class PretrainParams(TrainingStageParams):
    """Self-supervised pre-training (paper Sec. 3-4): DINO + iBOT + KoLeo, EMA teacher, FSDP via torchrun."""

    loss: LossConfig = Field(default_factory=LossConfig)


class AdaptParams(TrainingStageParams):
    """Short high-resolution phase at the end of pre-training (paper Sec. 4: 518 px, ~10k iterations)."""

    init: str  # the pre-training's full checkpoint (student, teacher, heads)


class DistillParams(TrainingStageParams):
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
        return backbone_params(cfg)


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


def _training(name: str, summary: str, params: type[Section], deps: tuple[str | DvcPath, ...]) -> Stage:
    """pretrain / adapt / distill: resumable checkpoints (persisted, so `dvc repro` resumes a killed run), the
    exported weights, and the loss and k-NN-monitor curves."""
    eval_dir = DvcPath("${demo_data.out}/eval/classification", f"{name}.monitor.eval_dir may be null")
    uncached = {"cache": False}
    return Stage(
        name, f"tasks.{name}:run_{name}", summary, params=params, trains=True, tracked=True,
        deps=(*deps, f"${{{name}.data.shards}}", eval_dir),
        outs=(DvcPath(f"${{{name}.out}}/run", "checkpoints survive a killed run, so `dvc repro` resumes",
                    {"persist": True, "cache": False}),
              f"${{{name}.out}}/export"),
        plots=(DvcPath(f"${{reports}}/plots/{name}.csv", "", uncached | {"x": "step", "y": "loss_total"}),
               DvcPath(f"${{reports}}/figures/{name}_loss.png", "", uncached),
               DvcPath(f"${{reports}}/plots/{name}_knn.csv", "the k-NN monitor during training",
                     uncached | {"x": "images_seen", "y": "knn_top1"}),
               DvcPath(f"${{reports}}/figures/{name}_learning.png",
                     "teacher entropy vs ln K, feature spread, k-NN vs images seen", uncached),
               DvcPath(f"${{reports}}/dvclive/{name}/plots/metrics", "DVCLive: every iteration's numbers, by step",
                     uncached | {"x": "step"})),
    )


# DAG order (paper §3 for curation, §4-5 for training).
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("demo-data", "tasks.demo_data:run_demo_data", "materialise the bundled raw crawl, seed and eval sets",
              params=DemoDataParams,
              outs=("${demo_data.out}",)),
        Stage("ingest", "tasks.ingest:run_ingest", "fetch, verify, normalise and store the crawl; quarantine bad files",
              params=IngestParams,
              deps=("${ingest.manifest}", DvcPath("${demo_data.out}/crawl", "the local files a demo manifest names")),
              outs=("${ingest.out}",)),
        Stage("dedup", "tasks.dedup:run_dedup", "drop near-duplicates: copy-detection kNN graph, one per component",
              params=DedupParams,
              deps=("${dedup.images}", DvcPath("${demo_data.out}/ground_truth.parquet",
                                             "dedup.ground_truth may be null: quality metrics only")),
              outs=("${dedup.out}",)),
        Stage("decontaminate", "tasks.decontaminate:run_decontaminate", "drop near-copies of evaluation images",
              params=DecontaminateParams,
              deps=("${decontaminate.dedup}", "${decontaminate.images}", "${demo_data.out}/eval"),
              outs=("${decontaminate.out}",)),
        Stage("retrieve", "tasks.retrieve:run_retrieve", "curate the pool by similarity to the seed set",
              params=RetrieveParams,
              deps=("${retrieve.pool}", "${decontaminate.dedup}", "${retrieve.images}", "${retrieve.seed_index}"),
              outs=("${retrieve.out}",)),
        Stage("shards", "tasks.shards:run_shards", "write the curated images as WebDataset tar shards",
              params=ShardsParams,
              deps=("${shards.curated}", "${shards.images}"),
              outs=(DvcPath("data/shards", "not ${shards.out}: that may be an s3:// prefix, which DVC cannot track"),)),
        _training("pretrain", "DINO + iBOT + KoLeo pre-training on the shards (torchrun, FSDP2)", PretrainParams, ()),
        _training("adapt", "short high-resolution phase from the pre-training checkpoint", AdaptParams,
                  ("${adapt.init}",)),
        _training("distill", "distil the frozen adapted teacher into a smaller student (EMA kept)",
                  DistillParams, ("${distill.teacher}",)),
        Stage("eval", "tasks.eval:run_eval", "k-NN, linear probe, linear segmentation vs random-init and raw pixels",
              params=EvalParams, tracked=True,
              # the training stages' exports, not `${eval.backbones[i].weights}` (which would fix the list's length):
              # any number of backbones; the list itself is a tracked param
              deps=("${pretrain.out}/export", "${adapt.out}/export", "${distill.out}/export",
                    "${eval.classification}", "${eval.segmentation}"),
              outs=("${eval.out}",
                    DvcPath("${reports}/eval_summary.md",
                          "cached: `dinov2-pipeline fetch reports/eval_summary.md --run <id>` gets it back")),
              plots=(DvcPath("${reports}/plots/eval_knn.csv", "",
                           {"cache": False, "x": "k", "y": "top1", "template": "linear"}),
                     DvcPath("${reports}/figures/eval", "PCA maps and segmentation samples, one per backbone; "
                                                      "pushed with the run"))),
    ]
}
