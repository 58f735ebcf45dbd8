"""The params loader: one typed source, one-line errors that name the key."""

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from tasks.params import Params, ParamsError, load_params, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_default_and_paper_profiles_validate():
    default = load_params(ROOT / "params.yaml")
    paper = load_params(ROOT / "params.paper.yaml")
    assert default.profile == "tiny-cpu" and paper.profile == "paper"
    assert default.ingest.min_side <= default.ingest.max_side


def test_a_profile_extends_another_and_states_only_what_differs(tmp_path):
    (tmp_path / "base.yaml").write_text(f"extends: {ROOT / 'params.yaml'}\nseed: 3\ningest:\n  workers: 4\n"
                                        "  allowed_formats: [PNG, JPEG]\n")
    (tmp_path / "over.yaml").write_text("extends: base.yaml\ningest:\n  workers: 2\n  allowed_formats: [GIF]\n")
    params = load_params(tmp_path / "over.yaml")
    assert params.seed == 3 and params.ingest.workers == 2  # merged key by key
    assert params.ingest.allowed_formats == ["GIF"]  # lists are replaced, not appended
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ParamsError, match="cycle"):
        load_params(tmp_path / "loop.yaml")


def _leaves(tree, path=()):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _without(tree, path):
    out = copy.deepcopy(tree)
    del _at(out, path[:-1])[path[-1]]
    return out


def test_params_yaml_states_no_value_the_code_already_defines():
    """Each value is defined once: a key of params.yaml whose removal leaves the resolved value unchanged restates a
    default of the code (the library's official training defaults, or an entry's default) and must go."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    restated, required = [], 0
    for path, value in _leaves(base):
        try:
            resolved = Params.model_validate(_without(base, path)).model_dump(mode="json")
        except ValidationError:
            required += 1  # no default in code: params.yaml is the one place for it
            continue
        if _at(resolved, path) == value:
            restated.append(".".join(path))
    assert restated == [], f"params.yaml restates code defaults: {restated}"
    assert required > 100  # the pipeline's own settings live only in params.yaml


def _resolves_to(tree: dict, path: tuple, value) -> bool:
    try:
        return _at(tree, path) == value
    except KeyError:  # a new entry of a mapping (loop.rounds: {round-2: ...}): not a restatement
        return False


@pytest.mark.parametrize("profile", sorted(p.name for p in ROOT.glob("params.*.yaml")))
def test_every_profile_is_an_overlay_that_states_only_what_differs(profile):
    """Each profile extends params.yaml and restates none of its resolved values (library defaults included)."""
    over = yaml.safe_load((ROOT / profile).read_text())
    assert over.pop("extends") == "params.yaml", f"{profile} must start with 'extends: params.yaml'"
    base = load_params(ROOT / "params.yaml").model_dump(mode="json")
    restated = [".".join(path) for path, value in _leaves(over) if _resolves_to(base, path, value)]
    assert restated == [], f"{profile} restates values params.yaml already resolves to: {restated}"
    load_params(ROOT / profile)  # and it validates


def test_library_configs_carry_their_constraints_and_defaults():
    """The training sections are the library's dataclasses: the official defaults and the range checks come from
    dinov2_core, not from a copy in the pipeline."""
    from dinov2_core.config import MultiCropConfig, OptimConfig

    params = load_params(ROOT / "params.yaml")
    assert type(params.pretrain.optim) is OptimConfig and type(params.pretrain.crops) is MultiCropConfig
    assert params.pretrain.optim.weight_decay == OptimConfig().weight_decay  # not stated in params.yaml
    assert params.pretrain.crops.global_crops_scale == MultiCropConfig().global_crops_scale
    with pytest.raises(ParamsError, match="pretrain.optim.momentum_teacher"):
        load_params(ROOT / "params.yaml", ["pretrain.optim.momentum_teacher=1.5"])
    with pytest.raises(ParamsError, match="model.img_size: set by each stage"):
        load_params(ROOT / "params.yaml", ["model.img_size=112"])
    with pytest.raises(ParamsError, match="missing key 'ingest.out'"):
        load_params(ROOT / "params.yaml", ["ingest={manifest: m.csv}"])


def test_unknown_key_names_the_key():
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", ["ingest.wrokers=4"])
    msg = str(err.value)
    assert "unknown key 'ingest.wrokers'" in msg and "\n" not in msg
    with pytest.raises(ParamsError, match=r"unknown key 'pretrain.optim.lr' \(check the spelling"):
        load_params(ROOT / "params.yaml", ["pretrain.optim.lr=3"])  # a section of dinov2_core's config dataclasses


@pytest.mark.parametrize(
    "override, key, expect",
    [
        ("ingest.workers=abc", "ingest.workers", "valid integer"),
        ("ingest.min_side=0", "ingest.min_side", "greater than 0"),
        ("demo_data.jpeg_fraction=1.5", "demo_data.jpeg_fraction", "less than or equal to 1"),
        ("profile=Not A Name", "profile", "should match pattern"),
        ("shards.out=", "shards.out", "at least 1 character"),  # an empty output path: the project's root
    ],
)
def test_bad_values_name_key_and_expectation(override, key, expect):
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", [override])
    msg = str(err.value)
    assert msg.startswith(f"{ROOT / 'params.yaml'}: {key}:") and expect in msg and "\n" not in msg


def test_cross_field_rule():
    with pytest.raises(ParamsError, match="min_side"):
        load_params(ROOT / "params.yaml", ["ingest.min_side=100", "ingest.max_side=50"])
    # the section's own rule names the values; the line does not end in the whole section as "got"
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", ["model.embed_dim=100"])
    assert str(err.value).endswith("model: Value error, embed_dim (100) must be a multiple of num_heads (3)")


def test_overrides_are_typed_and_applied():
    assert parse_override("ingest.workers=4") == ("ingest.workers", 4)
    assert parse_override("ingest.allowed_formats=[PNG]") == ("ingest.allowed_formats", ["PNG"])
    params = load_params(ROOT / "params.yaml", ["ingest.workers=3", "ingest.out=elsewhere"])
    assert params.ingest.workers == 3 and params.ingest.out == "elsewhere"
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        parse_override("ingest.workers")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
