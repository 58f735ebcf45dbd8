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
