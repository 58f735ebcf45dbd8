"""The one typed, validated view of `params.yaml` (and of any profile file beside it).

Every stage reads its section from here, never from raw YAML, so a typo or an out-of-range value is caught
before any work starts and is reported as one line that names the key and what it expects.

`Params` is composed from the stage registry (each stage's section is declared beside its `Stage(...)` in
`tasks/stages.py`) on top of what every stage shares (`ProjectParams`), so adding a stage never touches this file.

Each value is defined once. The pipeline's own settings (paths, curation, evaluation, launching) have no defaults
in code: `params.yaml` is where they live and what DVC tracks. The training settings are the library's config
dataclasses with the official defaults; `params.yaml` states only what this profile changes, and the other profiles
are overlays (`extends: params.yaml`) that state only what they change (tests/test_params.py checks all of it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, TypeAdapter, ValidationError, create_model, field_serializer, model_validator

from dinov2_core.config import BackboneConfig, NonNegInt
from tasks.sections import (
    STAGE_SETS_IMG_SIZE,
    LaunchParams,
    LoopParams,
    Section,
    StorageParams,
    TrackingParams,
    backbone_params,
)
from tasks.stages import STAGES, Stage


class ParamsError(ValueError):
    """A params file or override is wrong; the message is one line naming the key."""


class ProjectParams(Section):
    """What every stage shares: the profile's name and seed, where reports go, storage, trackers, the backbone,
    launching."""

    profile: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$")]  # a name: tiny-cpu, quality-cpu, paper, yours
    seed: NonNegInt
    reports: str
    storage: StorageParams
    tracking: TrackingParams
    model: BackboneConfig = Field(default_factory=BackboneConfig)
    launch: LaunchParams
    loop: LoopParams

    @field_serializer("model")
    def _no_img_size(self, cfg: BackboneConfig) -> dict[str, Any] | None:
        return backbone_params(cfg)

    @model_validator(mode="before")
    @classmethod
    def _img_size_is_derived(cls, tree: Any) -> Any:
        for path in STAGE_SETS_IMG_SIZE:
            node = tree
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            if isinstance(node, dict) and "img_size" in node:
                raise ValueError(f"{'.'.join(path)}.img_size: set by each stage from its crops.global_crops_size; "
                                 f"remove it")
        return tree


def compose_params(stages: dict[str, Stage]) -> type[ProjectParams]:
    """The whole params file: the shared sections plus one required section per registered stage."""
    sections: dict[str, Any] = {stage.section: (stage.params, ...) for stage in stages.values()}
    return create_model("Params", __base__=ProjectParams, __doc__="The whole params file (tasks/stages.py lists "
                        "the stages whose sections it holds).", **sections)


Params = compose_params(STAGES)


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):  # a section's / a library dataclass's
        return f"{source}: unknown key '{key}' (check the spelling; known keys: tasks/stages.py, tasks/sections.py, dinov2_core/config.py)"
    if kind == "missing":
        return (f"{source}: missing key '{key}' (params.yaml states every pipeline setting; a profile starts with "
                f"'extends: params.yaml' and states only what differs)")
    got = first.get("input")
    # a whole section's own check (a model validator) already names the values; the section itself is no help
    got_s = "" if isinstance(got, dict) else f", got {got!r}"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {first['msg']}{got_s}{more}"


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
