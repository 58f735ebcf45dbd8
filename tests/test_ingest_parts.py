"""Ingest in parts: 2 worker processes over local files, a loopback HTTP server and the S3-compatible server give
the outputs of one worker, byte for byte; a killed part is redone alone."""

from __future__ import annotations

import hashlib
import random
import shutil

import pandas as pd
import pytest

from tasks.ingest import run_ingest
from tasks.ingest_parts import FAULT_ENV, PartsFailed, parts_folder

from .test_ingest_sources import _adversarial_rows, _Handler, _params, crawl_bucket, server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


def _outputs(out) -> dict[str, str]:
    """Every output file (tables and stored images) by its digest."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file()}


def _crawl(tmp_path, server, crawl_bucket) -> list[str]:  # noqa: F811
    """Local files (in the crawl folder of both runs), HTTP and S3 rows."""
    crawl = tmp_path / "one" / "crawl"
    crawl.mkdir(parents=True)
    rows, blobs = _adversarial_rows(random.Random(3), server.url, crawl)
    shutil.copytree(crawl, tmp_path / "two" / "crawl")
    _Handler.files = {f"/{name}": data for name, data in blobs.items()}
    _, put = crawl_bucket
    s3_rows = [f"s3://crawl/{k}" for k in put(12, 700)]
    return rows[:150] + s3_rows + s3_rows[:3] + rows[150:250]  # a few exact duplicates across the parts


def test_two_parts_give_the_outputs_of_one_worker_and_a_killed_part_is_redone_alone(
        tmp_path, small_params_factory, server, crawl_bucket, monkeypatch):  # noqa: F811
    rows = _crawl(tmp_path, server, crawl_bucket)
    extra = ["ingest.http_retries=0", "ingest.max_transient_fraction=1.0", "ingest.max_bytes=100000"]
    one = run_ingest(_params(tmp_path / "one", small_params_factory, rows, extra))
    assert one.metrics["reconciles"] and one.metrics["kept"] >= 12 and one.metrics["exact_duplicates"] >= 3

    params = _params(tmp_path / "two", small_params_factory, rows, [*extra, "ingest.parts=2"])
    monkeypatch.setenv(FAULT_ENV, "1")  # part 1's process dies before writing its outcomes
    with pytest.raises(PartsFailed, match=r"1 of 2 part\(s\) did not finish") as err:
        run_ingest(params)
    assert err.value.transient and len(str(err.value).splitlines()) == 1
    folder = parts_folder(params, rows)
    done = {p.name: p.stat().st_mtime_ns for p in folder.glob("part-*.parquet")}
    assert list(done) == ["part-00000.parquet"]
    monkeypatch.delenv(FAULT_ENV)
    requests_before = len(_Handler.requests)
    two = run_ingest(params)
    assert two.metrics["parts"] == 2 and two.metrics["reconciles"]
    # only part 1's rows were fetched again (part 0's outcome file was kept as it was)
    def http_names(part_rows):
        return {r.split("/")[-1] for r in part_rows if isinstance(r, str) and r.startswith("http://127.0.0.1")}

    first_only = http_names(rows[:len(rows) // 2]) - http_names(rows[len(rows) // 2:])
    fetched = {r.split("/")[-1] for r in _Handler.requests[requests_before:]}
    assert first_only and fetched and not fetched & first_only
    assert not folder.exists()  # cleared once the outputs are complete

    # the same rows, verdicts and reasons; messages differ only where they name each run's own crawl folder
    one.quarantine["message"] = one.quarantine["message"].str.replace(str(tmp_path / "one"), str(tmp_path / "two"))
    for name in ("manifest", "duplicates", "quarantine"):
        pd.testing.assert_frame_equal(getattr(one, name), getattr(two, name), check_dtype=False, obj=name)
    files_one, files_two = _outputs(tmp_path / "one" / "out"), _outputs(tmp_path / "two" / "out")
    assert files_one.keys() == files_two.keys()
    assert {k: v for k, v in files_one.items() if k != "quarantine.parquet"} == \
        {k: v for k, v in files_two.items() if k != "quarantine.parquet"}  # (its messages: compared above)
