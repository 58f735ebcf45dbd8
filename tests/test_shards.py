"""The shards stage: balanced, reproducible WebDataset tars, locally and on a real S3-compatible server."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinov2_core.data.shards import iter_shard_samples
from tasks.shards import UnsafeKeyError, plan_shards, run_shards, safe_key
from tasks.validation import DataQualityError


@pytest.fixture
def curated_params(ingested, tmp_path, small_params_factory, demo_dir):
    params, result, _ = ingested
    curated = result.manifest[["sha256"]].assign(cluster=np.arange(len(result.manifest)) % 7, method="test")
    curated.to_parquet(tmp_path / "curated.parquet")

    def make(out: str, *extra: str):
        return small_params_factory(demo_dir, [
            f"shards.curated={tmp_path}/curated.parquet", f"shards.images={params.ingest.out}",
            f"shards.out={out}", f"reports={tmp_path}/reports", "shards.target_samples=60", *extra])

    return make, curated


def test_plan_balances_bytes():
    sizes = np.array([100.0] * 50 + [1000.0] * 5)
    groups = plan_shards(sizes, target_samples=1000, target_bytes=2500)
    totals = [sizes[g].sum() for g in groups]
    assert len(groups) == 4 and sorted(np.concatenate(groups).tolist()) == list(range(55))
    assert max(totals) / min(totals) < 1.6
    assert plan_shards(np.array([]), 10, 10) == []


def test_safe_keys():
    assert safe_key("ab12_-") == "ab12_-"
    for bad in ["../etc/passwd", "a.b", "a/b", "", "x" * 200, "k\x00"]:
        with pytest.raises(UnsafeKeyError):
            safe_key(bad)


def test_local_round_trip_every_image_once_and_reproducible(curated_params, tmp_path):
    make, curated = curated_params
    out = tmp_path / "shards"
    metrics = run_shards(make(str(out)))
    tars = sorted(out.glob("shard-*.tar"))
    assert metrics["shards"] == len(tars) >= len(curated) // 60
    samples = list(iter_shard_samples([str(t) for t in tars]))
    keys = [s["__key__"] for s in samples]
    assert sorted(keys) == sorted(curated["sha256"]) and len(set(keys)) == len(keys)
    record = json.loads(samples[0]["json"])
    assert record["sha256"] == samples[0]["__key__"] and "cluster" in record and "source" in record
    index = json.loads((out / "shards.json").read_text())
    assert index["count"] == len(curated)
    for shard in index["shards"]:
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    assert metrics["shard_bytes_imbalance"] < 1.5
    with tarfile.open(tars[0]) as tar:  # plain ustar members: no per-member PAX header doubling the small ones
        members = tar.getmembers()
    assert members and all(m.pax_headers == {} and m.mtime == 0 and m.uname == "" for m in members)
    padded = sum(512 + -(-m.size // 512) * 512 for m in members)  # a header block + the data, padded to blocks
    assert tars[0].stat().st_size <= padded + 20 * 512  # + the end-of-archive blocks and record padding
    first = {t.name: t.read_bytes() for t in tars}
    # A rerun with a bigger shard size writes fewer shards, byte-identical for the same plan, none left over.
    run_shards(make(str(out)))
    assert {t.name: t.read_bytes() for t in sorted(out.glob("shard-*.tar"))} == first
    run_shards(make(str(out), "shards.target_samples=100000"))
    assert len(list(out.glob("shard-*.tar"))) == 1


def test_s3_round_trip(curated_params, s3_bucket, s3_env, tmp_path):
    import boto3

    make, curated = curated_params
    metrics = run_shards(make(f"s3://{s3_bucket}/curated/v1", f"shards.index_copy={tmp_path}/index.json"))
    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="curated/v1/")["Contents"])
    assert "curated/v1/shards.json" in keys and sum(k.endswith(".tar") for k in keys) == metrics["shards"]
    assert metrics["destination"] == "s3" and metrics["samples"] == len(curated)
    assert json.loads(Path(tmp_path / "index.json").read_text())["count"] == len(curated)


def test_input_check_rejects_unknown_or_unsafe_keys(curated_params, tmp_path):
    make, curated = curated_params
    bad = pd.concat([curated, pd.DataFrame({"sha256": ["../../evil"], "cluster": [0], "method": ["x"]})])
    bad.to_parquet(tmp_path / "curated.parquet")
    with pytest.raises(DataQualityError, match="expect_column_values_to_be_in_set|match_regex"):
        run_shards(make(str(tmp_path / "s")))
    assert not list((tmp_path / "s").glob("*.tar")) if (tmp_path / "s").exists() else True
