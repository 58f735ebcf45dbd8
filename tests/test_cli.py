"""The one CLI entry point."""

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app
from tasks.stages import STAGES


def test_help_lists_every_stage():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for name in STAGES:
        assert name in res.output


def test_the_cli_starts_without_torch_or_great_expectations():
    """Every DVC stage command starts this CLI; the stage's own module imports what it needs. torch at the top
    (it came in through the job-submission helper) cost each of a run's stage processes ~3 s."""
    code = "import sys, flows.cli; print(sorted({'torch', 'great_expectations', 'prefect'} & set(sys.modules)))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]", res.stdout


def test_unknown_stage_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["stage", "nope"])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "unknown stage 'nope'" in res.stderr


def test_bad_override_is_one_line_naming_the_key():
    res = CliRunner().invoke(app, ["stage", "ingest", "--set", "ingest.max_pixels=-3"])
    assert res.exit_code == 2
    assert res.stderr.strip().startswith("error: params.yaml: ingest.max_pixels:")
    assert res.stderr.count("\n") == 1


def test_run_with_a_bad_profile_or_override_fails_in_one_line_before_prefect_starts(tmp_path):
    for args, expect in ((["--profile", "missing.yaml"], "missing.yaml: params file not found"),
                         (["--set", "pretrain.optim.base_lr=abc"], "pretrain.optim.base_lr: Input should be")):
        res = CliRunner().invoke(app, ["run", "--project", str(Path(__file__).resolve().parents[1]), *args])
        assert res.exit_code == 2 and res.stderr.count("\n") == 1 and expect in res.stderr, res.output
        assert "Starting temporary server" not in res.output


def test_stage_runs_on_user_data(tmp_path):
    import io

    import pandas as pd
    from PIL import Image

    crawl = tmp_path / "mine"
    crawl.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, "PNG")
    (crawl / "one.png").write_bytes(buf.getvalue())
    pd.DataFrame({"url": ["one.png", "one.png"]}).to_csv(crawl / "crawl.csv", index=False)
    workspace = Path(__file__).resolve().parents[1] / "reports" / "metrics" / "ingest.json"
    before = workspace.read_bytes() if workspace.exists() else None
    res = CliRunner().invoke(app, ["stage", "ingest", "--set", f"ingest.manifest={crawl}/crawl.csv",
                                   "--set", f"ingest.out={tmp_path}/out"])
    assert res.exit_code == 0, res.output
    manifest = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert len(manifest) == 1 and (manifest["width"] == 64).all()
    # The ad-hoc run's metrics and validation sit beside its outputs; the pipeline's reports are untouched.
    metrics = json.loads((tmp_path / "out" / "reports" / "metrics" / "ingest.json").read_text())
    assert metrics["input_rows"] == 2 and (tmp_path / "out" / "reports" / "validation" / "ingest.json").exists()
    assert (workspace.read_bytes() if workspace.exists() else None) == before
    assert f"reports in {tmp_path}/out/reports" in res.stderr


def test_cost_of_the_paper_profile_on_the_meta_device():
    paper = Path(__file__).resolve().parents[1] / "params.paper.yaml"
    res = CliRunner().invoke(app, ["cost", "-p", str(paper)])
    assert res.exit_code == 0, res.output
    pretrain = next(line for line in res.output.splitlines() if line.startswith("pretrain"))
    assert "vit_giant2" in pretrain and "1134.8 M" in pretrain and "625,000" in pretrain
    assert "GPU-hours" in res.output
