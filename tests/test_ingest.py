"""The ingest stage on the planted demo crawl and on every kind of source (local, file://, http://, s3://)."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tasks.demo_data import BROKEN_KINDS
from tasks.ingest import REASONS, run_ingest


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _outcomes(result) -> pd.DataFrame:
    parts = [
        result.manifest.assign(outcome="kept", reason="")[["row", "outcome", "reason"]],
        result.duplicates.assign(outcome="exact_duplicate", reason="")[["row", "outcome", "reason"]],
        result.quarantine.assign(outcome="quarantined")[["row", "outcome", "reason"]],
    ]
    return pd.concat(parts).set_index("row").sort_index()


def test_counts_reconcile(ingested):
    _params, result, gt = ingested
    out = _outcomes(result)
    assert out.index.is_unique and out.index.tolist() == list(range(len(gt)))
    m = result.metrics
    assert m["reconciles"] and m["input_rows"] == m["kept"] + m["exact_duplicates"] + m["quarantined"] == len(gt)
    assert set(result.quarantine["reason"]) <= set(REASONS)


@pytest.mark.parametrize("kind", sorted(BROKEN_KINDS))
def test_every_broken_kind_gets_the_right_outcome(ingested, kind):
    _, result, gt = ingested
    out = _outcomes(result)
    row = gt.loc[gt["broken_kind"] == kind].iloc[0]
    expected_outcome, expected_reason = BROKEN_KINDS[kind]
    got = out.loc[row["row"]]
    assert got["outcome"] == expected_outcome, (kind, got.to_dict())
    assert got["reason"] == expected_reason


def test_ground_truth_outcomes_match(ingested):
    """All planted rows, not only the broken corpus: kept / exact duplicate / quarantined as planted."""
    _, result, gt = ingested
    out = _outcomes(result)
    merged = gt.set_index("row").join(out)
    mismatched = merged[merged["expected_outcome"] != merged["outcome"]]
    assert mismatched.empty, mismatched[["url", "kind", "expected_outcome", "outcome", "reason"]].head()


def test_exact_duplicates_point_at_the_first_identical_row(ingested, demo_dir):
    _, result, gt = ingested
    dups = result.duplicates
    planted = gt[gt["kind"] == "exact_duplicate"]
    assert len(dups) >= len(planted) * 0.5 and len(dups) > 0  # each planted copy or its original is the dup
    for _, d in dups.iterrows():
        assert d["duplicate_of_row"] < d["row"]
        assert gt.loc[d["row"], "sha256"] == gt.loc[d["duplicate_of_row"], "sha256"] == d["sha256"]
    # every planted exact duplicate ends up in the same identity as its original
    by_url = gt.drop_duplicates("url").set_index("url")["sha256"]
    for _, p in planted.iterrows():
        assert p["sha256"] == by_url[p["original"]]


def test_normalised_images(ingested):
    params, result, gt = ingested
    out = Path(params.ingest.out)
    m = result.manifest.set_index("row")

    def stored(kind):
        row = gt.loc[gt["broken_kind"] == kind, "row"].iloc[0]
        return m.loc[row], Image.open(out / m.loc[row, "path"])

    rec, img = stored("exif_rotated_jpeg")  # planted 150x100 with orientation 6 (rotate 90)
    assert (rec["width"], rec["height"]) == (100, 150) and img.size == (100, 150)
    rec, img = stored("cmyk_jpeg")
    assert rec["mode"] == "CMYK" and img.mode == "RGB" and rec["stored_format"] == "PNG"
    rec, img = stored("png_16bit")
    arr = np.asarray(img)
    assert rec["mode"].startswith("I") and img.mode == "RGB" and arr.min() == 0 and arr.max() == 255
    rec, img = stored("palette_gif_transparency")
    assert rec["format"] == "GIF" and img.mode == "RGB"
    # plain grey/RGB JPEG and PNG are stored byte-for-byte (no generation loss)
    plain = result.manifest[(result.manifest["format"] == "JPEG") & (result.manifest["mode"] == "L")].iloc[0]
    src = Path(params.ingest.manifest).parent / plain["source"]
    assert (out / plain["path"]).read_bytes() == src.read_bytes()


def test_rerun_is_byte_identical(ingested, small_params_factory, demo_dir, tmp_path):
    params, _result, _ = ingested
    again = small_params_factory(demo_dir, [f"ingest.out={tmp_path}/ingest", f"reports={tmp_path}/reports"])
    run_ingest(again)
    assert _digest(Path(params.ingest.out)) == _digest(tmp_path / "ingest")
    run_ingest(again)  # over its own previous output
    assert _digest(Path(params.ingest.out)) == _digest(tmp_path / "ingest")


def test_writes_only_inside_out_and_reports(demo_dir, small_params_factory, tmp_path):
    before = _digest(demo_dir)
    params = small_params_factory(demo_dir, [f"ingest.out={tmp_path}/o/ingest", f"reports={tmp_path}/o/reports"])
    run_ingest(params)
    assert _digest(demo_dir) == before  # the crawl folder (incl. the '../' rows) is untouched
    written = {p.relative_to(tmp_path).parts[:2] for p in tmp_path.rglob("*") if p.is_file()}
    assert written <= {("o", "ingest"), ("o", "reports")}


def test_throughput_in_metrics(ingested):
    m = ingested[1].metrics
    assert m["images_per_second"] > 0 and m["seconds"] > 0


# ------------------------------------------------------------------------------------------ sources
def _png(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    files: ClassVar[dict[str, bytes]] = {}
    flaky_left: ClassVar[dict[str, int]] = {"n": 0}

    def do_GET(self):
        if self.path == "/flaky.png" and self.flaky_left["n"] > 0:
            self.flaky_left["n"] -= 1
            self.send_error(503)
            return
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    _Handler.files = {"/a.png": _png(1), "/flaky.png": _png(2), "/big.png": _png(3, (400, 400))}
    _Handler.flaky_left["n"] = 2
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _run_crawl(tmp_path, small_params_factory, urls, extra=()):
    crawl = tmp_path / "crawl"
    crawl.mkdir(exist_ok=True)
    pd.DataFrame({"url": urls}).to_csv(crawl / "manifest.csv", index=False)
    params = small_params_factory(tmp_path, [f"ingest.manifest={crawl}/manifest.csv", f"ingest.out={tmp_path}/out",
                                             f"reports={tmp_path}/reports", *extra])
    result = run_ingest(params)
    return _outcomes(result), result


def test_http_sources_retry_transient_and_not_404(tmp_path, small_params_factory, http_server):
    out, _ = _run_crawl(tmp_path, small_params_factory,
                        [f"{http_server}/a.png", f"{http_server}/flaky.png", f"{http_server}/missing.png"])
    assert out["outcome"].tolist() == ["kept", "kept", "quarantined"]  # flaky: two 503s, then 200
    assert out.loc[2, "reason"] == "fetch_error"
    assert _Handler.flaky_left["n"] == 0


def test_byte_limit_and_formats(tmp_path, small_params_factory, http_server):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    (crawl / "x.png").write_bytes(_png(5))
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, "JPEG")
    (crawl / "y.jpg").write_bytes(buf.getvalue())
    out, _result = _run_crawl(tmp_path, small_params_factory, [f"{http_server}/big.png", "x.png", "y.jpg"],
                             ["ingest.max_bytes=20000", "ingest.allowed_formats=[PNG]"])
    assert out["reason"].tolist() == ["too_many_bytes", "", "unsupported_format"]


def test_file_urls_and_absolute_paths(tmp_path, small_params_factory):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    (crawl / "a.png").write_bytes(_png(7))
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(_png(8))
    urls = [f"file://{crawl}/a.png", str(crawl / "a.png"), str(outside), f"file://{outside}"]
    out, _ = _run_crawl(tmp_path, small_params_factory, urls)
    assert out["outcome"].tolist() == ["kept", "exact_duplicate", "quarantined", "quarantined"]
    assert set(out["reason"][2:]) == {"unsafe_path"}
    out, _ = _run_crawl(tmp_path, small_params_factory, urls, ["ingest.allow_outside_root=true"])
    assert out["outcome"].tolist() == ["kept", "exact_duplicate", "kept", "exact_duplicate"]


def test_s3_sources_through_a_real_s3_server(tmp_path, small_params_factory, s3_bucket, s3_env):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    s3.put_object(Bucket=s3_bucket, Key="crawl/a.png", Body=_png(11))
    s3.put_object(Bucket=s3_bucket, Key="crawl/notes.txt", Body=b"not an image")
    urls = [f"s3://{s3_bucket}/crawl/a.png", f"s3://{s3_bucket}/crawl/missing.png", f"s3://{s3_bucket}/crawl/notes.txt"]
    out, result = _run_crawl(tmp_path, small_params_factory, urls)
    assert out["outcome"].tolist() == ["kept", "quarantined", "quarantined"]
    assert out["reason"].tolist()[1:] == ["fetch_error", "not_an_image"]
    assert result.metrics["input_by_scheme"] == {"s3": 3}


def test_missing_s3_credentials_fail_the_stage_with_one_line(tmp_path, s3_without_credentials):
    from typer.testing import CliRunner

    from flows.cli import EXIT_CREDENTIALS, app

    crawl = tmp_path / "crawl"
    crawl.mkdir()
    pd.DataFrame({"url": ["s3://some-bucket/a.png"]}).to_csv(crawl / "manifest.csv", index=False)
    res = CliRunner().invoke(app, ["stage", "ingest", "--set", f"ingest.manifest={crawl}/manifest.csv",
                                   "--set", f"ingest.out={tmp_path}/out", "--set", f"reports={tmp_path}/r"])
    assert res.exit_code == EXIT_CREDENTIALS  # final: the flow does not retry it
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no S3 credentials" in lines[0] and "AWS_ACCESS_KEY_ID" in lines[0]
    assert "Traceback" not in res.output


def test_a_crawl_with_nothing_to_keep_fails_the_stage_in_one_line_and_keeps_the_verdicts(tmp_path):
    """Limits that refuse every image (or a crawl of junk) must stop the pipeline at ingest, saying why, not two
    stages later in the copy detector's array shapes."""
    from typer.testing import CliRunner

    from flows.cli import app

    crawl = tmp_path / "crawl"
    crawl.mkdir()
    (crawl / "a.png").write_bytes(_png(1))
    (crawl / "b.png").write_bytes(_png(2))
    (crawl / "notes.txt").write_bytes(b"not an image")
    pd.DataFrame({"url": ["a.png", "b.png", "notes.txt"]}).to_csv(crawl / "manifest.csv", index=False)
    res = CliRunner().invoke(app, ["stage", "ingest", "--set", f"ingest.manifest={crawl}/manifest.csv",
                                   "--set", f"ingest.out={tmp_path}/out", "--set", f"reports={tmp_path}/r",
                                   "--set", "ingest.min_side=64"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "none of the 3 crawl rows was kept (too_small 2, not_an_image 1" in lines[0], lines
    assert "ingest.min_side" in lines[0]
    assert len(pd.read_parquet(tmp_path / "out" / "quarantine.parquet")) == 3


_NOT_CSV = "not a readable UTF-8 CSV (a header row naming the columns, then a row each)"


@pytest.mark.parametrize("name, content, expect", [
    ("binary.csv", bytes(range(128, 256)) * 8, f"{_NOT_CSV}: UnicodeDecodeError"),
    ("quote.csv", b'url\n"unterminated\n', f"{_NOT_CSV}: ParserError"),
    ("nothing.csv", b"", "EmptyDataError"),
    ("header.csv", b"url\n", "no rows under its header (nothing to ingest)"),
    ("crawl.parquet", b"PAR1 not really", "not a readable Parquet: ArrowInvalid"),
])
def test_a_crawl_manifest_that_cannot_be_read_is_one_line_naming_it(tmp_path, name, content, expect):
    from tasks.ingest import read_crawl_manifest

    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as err:
        read_crawl_manifest(tmp_path / name, "url")
    msg = str(err.value)
    assert msg.startswith(f"crawl manifest {tmp_path / name}: ") and expect in msg and "\n" not in msg, msg


def test_a_seed_or_eval_index_names_what_it_lacks_in_one_line(tmp_path):
    from tasks.image_store import load_indexed_images

    (tmp_path / "a.png").write_bytes(_png(3))
    (tmp_path / "seed.csv").write_text("path,id\na.png,1\ngone.png,2\n")
    with pytest.raises(FileNotFoundError) as err:
        load_indexed_images(tmp_path / "seed.csv", "path", "id", "seed set index")
    assert str(err.value) == (f"seed set index {tmp_path / 'seed.csv'}: 1 of 2 listed images are missing, e.g. "
                              "'gone.png' (paths are relative to the index's folder)")
    (tmp_path / "seed.csv").write_text("path,id\na.png,1\n")
    assert load_indexed_images(tmp_path / "seed.csv", "path", "id") == (["1"], [tmp_path / "a.png"])
    with pytest.raises(ValueError, match=r"seed set index .*seed.csv: no 'name' column \(columns: \['path', 'id'\]\)"):
        load_indexed_images(tmp_path / "seed.csv", "name", "id", "seed set index")


def test_gx_failure_stops_the_stage_with_the_expectation_name(tmp_path, small_params_factory, monkeypatch):
    """Deliberately bad data at the boundary (a duplicated identity) fails the stage before outputs are written."""
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks import ingest

    real_checks = ingest.ingest_checks

    def corrupted(manifest, *args, **kwargs):
        bad = pd.concat([manifest, manifest.iloc[:1]], ignore_index=True)
        return real_checks(bad, *args, **kwargs)

    monkeypatch.setattr(ingest, "ingest_checks", corrupted)
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    (crawl / "a.png").write_bytes(_png(3))
    pd.DataFrame({"url": ["a.png"]}).to_csv(crawl / "manifest.csv", index=False)
    res = CliRunner().invoke(app, ["stage", "ingest", "--set", f"ingest.manifest={crawl}/manifest.csv",
                                   "--set", f"ingest.out={tmp_path}/out", "--set", f"reports={tmp_path}/r"])
    assert res.exit_code == 3
    line = res.stderr.strip()
    assert "\n" not in line and "expect_column_values_to_be_unique" in line and "sha256" in line
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    report = pd.read_json(tmp_path / "r" / "validation" / "ingest.json", typ="series")
    assert report["success"] is False or report["success"] == False
