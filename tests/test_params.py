"""The params loader: one typed source, one-line errors that name the key."""

from pathlib import Path

import pytest

from tasks.params import ParamsError, load_params, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_default_and_paper_profiles_validate():
    default = load_params(ROOT / "params.yaml")
    paper = load_params(ROOT / "params.paper.yaml")
    assert default.profile == "tiny-cpu" and paper.profile == "paper"
    assert default.ingest.min_side <= default.ingest.max_side


def test_a_profile_extends_another_and_states_only_what_differs(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 3\ningest:\n  workers: 4\n  allowed_formats: [PNG, JPEG]\n")
    (tmp_path / "over.yaml").write_text("extends: base.yaml\ningest:\n  workers: 2\n  allowed_formats: [GIF]\n")
    params = load_params(tmp_path / "over.yaml")
    assert params.seed == 3 and params.ingest.workers == 2  # merged key by key
    assert params.ingest.allowed_formats == ["GIF"]  # lists are replaced, not appended
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ParamsError, match="cycle"):
        load_params(tmp_path / "loop.yaml")


def _restated(base, over, path=""):
    """Leaves of ``over`` whose value equals ``base``'s (lists and inline mappings compared key by key)."""
    for key, value in over.items():
        where = f"{path}.{key}" if path else key
        if key == "extends" or key not in base:
            continue
        if isinstance(value, dict) and isinstance(base[key], dict):
            yield from _restated(base[key], value, where)
        elif value == base[key]:
            yield where


@pytest.mark.parametrize("profile", sorted(p.name for p in ROOT.glob("params.*.yaml")))
def test_every_profile_is_an_overlay_that_states_only_what_differs(profile):
    """A value lives in one place: each profile extends params.yaml and restates none of its values."""
    import yaml

    over = yaml.safe_load((ROOT / profile).read_text())
    assert over.get("extends") == "params.yaml", f"{profile} must start with 'extends: params.yaml'"
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert list(_restated(base, over)) == [], f"{profile} restates values of params.yaml"
    load_params(ROOT / profile)  # and it validates


def test_unknown_key_names_the_key(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("ingest:\n  wrokers: 4\n")
    with pytest.raises(ParamsError) as err:
        load_params(bad)
    msg = str(err.value)
    assert "unknown key 'ingest.wrokers'" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "override, key, expect",
    [
        ("ingest.workers=abc", "ingest.workers", "valid integer"),
        ("ingest.min_side=0", "ingest.min_side", "greater than or equal to 1"),
        ("demo_data.jpeg_fraction=1.5", "demo_data.jpeg_fraction", "less than or equal to 1"),
        ("profile=huge", "profile", "'quality-cpu' or 'paper'"),
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
