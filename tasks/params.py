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
    http_timeout_s: PosFloat = 10.0
    http_retries: NonNegInt = 2
    retry_backoff_s: Annotated[float, Field(ge=0.0)] = 0.5
    allow_outside_root: bool = False  # local paths must stay under the manifest's folder unless this is set

    @model_validator(mode="after")
    def _sides(self) -> "IngestParams":
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) must be <= max_side ({self.max_side})")
        return self


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


class Params(Section):
    """The whole params file. Add a section here when a stage is added."""

    profile: Literal["tiny-cpu", "paper"] = "tiny-cpu"
    seed: NonNegInt = 0
    reports: str = "reports"
    storage: StorageParams = Field(default_factory=StorageParams)
    demo_data: DemoDataParams = Field(default_factory=DemoDataParams)
    ingest: IngestParams = Field(default_factory=IngestParams)
    shards: ShardsParams = Field(default_factory=ShardsParams)


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


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, merge overrides into, and validate a params file. Raises ParamsError with one line."""
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
    tree = copy.deepcopy(tree)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as err:
        raise ParamsError(_format_error(str(path), err)) from None


def params_digest(section: BaseModel) -> dict[str, Any]:
    """Plain-JSON view of a section, for metrics files that say what a stage ran with."""
    return section.model_dump(mode="json")
