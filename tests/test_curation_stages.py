"""The curation stages end to end on the small demo crawl: quality against the planted ground truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.decontaminate import run_decontaminate
from tasks.dedup import run_dedup
from tasks.retrieve import choose_mode, run_retrieve
from tasks.shards import run_shards
from tasks.validation import DataQualityError


@pytest.fixture(scope="session")
def curated(ingested, demo_dir, small_params_factory, tmp_path_factory):
    ingest_params, _, _ = ingested
    root = tmp_path_factory.mktemp("curation")
    d = demo_dir / "demo"
    params = small_params_factory(demo_dir, [
        f"ingest.out={ingest_params.ingest.out}", f"reports={root}/reports",
        f"dedup.images={ingest_params.ingest.out}", f"dedup.out={root}/dedup", f"dedup.cache_dir={root}/cache",
        f"dedup.ground_truth={d}/ground_truth.parquet",
        f"decontaminate.dedup={root}/dedup", f"decontaminate.images={ingest_params.ingest.out}",
        f"decontaminate.out={root}/decontam", f"decontaminate.cache_dir={root}/cache",
        f"decontaminate.ground_truth={d}/ground_truth.parquet",
        (f"decontaminate.eval_sets=[{{index: {d}/eval/classification/test.csv}}, "
        f"{{index: {d}/eval/segmentation/test.csv, path_column: image}}]"),
        f"retrieve.pool={root}/decontam", f"retrieve.images={ingest_params.ingest.out}",
        f"retrieve.seed_index={d}/seed/seed.csv", f"retrieve.out={root}/retrieve",
        f"retrieve.cache_dir={root}/cache", f"retrieve.ground_truth={d}/ground_truth.parquet",
        "retrieve.large_seed_set=10", "retrieve.k=8",
        f"shards.curated={root}/retrieve/curated.parquet", f"shards.images={ingest_params.ingest.out}",
        f"shards.out={root}/shards", "shards.target_samples=50",
    ])
    run_dedup(params)
    run_decontaminate(params)
    run_retrieve(params)
    run_shards(params)
    metrics = {s: json.loads((root / "reports" / "metrics" / f"{s}.json").read_text())
               for s in ("dedup", "decontaminate", "retrieve", "shards")}
    return params, root, metrics


def test_dedup_finds_planted_near_duplicates(curated):
    _, root, metrics = curated
    q = metrics["dedup"]["quality"]
    assert q["planted_pairs"] >= 20
    assert q["recall"] >= 0.85 and q["precision"] >= 0.95, q
    # wrong merges split into the crawl's own pixel copies and look-alikes lost; counting the copies only adds
    assert 0 <= q["wrongly_removed_pixel_near_copies"] <= q["distinct_images_wrongly_removed"]
    assert q["precision"] <= q["precision_pixel_copies_counted"] <= 1.0
    dedup = pd.read_parquet(root / "dedup" / "dedup.parquet")
    kept = set(dedup.loc[dedup["kept"], "key"])
    assert dedup.loc[~dedup["kept"], "duplicate_of"].isin(kept).all()
    assert metrics["dedup"]["images"] == metrics["dedup"]["kept"] + metrics["dedup"]["removed"]
    v = metrics["dedup"]["verification"]  # the two-stage graph says how much it verified
    assert v["verify"] and v["n_candidate_pairs"] >= metrics["dedup"]["images"]
    assert 0 <= v["n_verified_copies"] <= v["n_verified_pairs"] <= v["n_candidate_pairs"]


def test_every_planted_eval_copy_is_removed(curated):
    _, root, metrics = curated
    q = metrics["decontaminate"]["quality"]
    assert q["planted_eval_copies_in_pool"] >= 5
    assert q["planted_eval_copies_removed"] == q["planted_eval_copies_in_pool"]
    assert q["clean_removed_fraction"] <= 0.06, q  # the price of removing every copy stays small
    # the clean images removed split into pixel near-copies of their eval match and distinct ones, which add up
    near, distinct = q["clean_removed_pixel_near_copies"], q["clean_removed_distinct_fraction"]
    assert 0 <= near <= q["clean_images_removed"] and distinct <= q["clean_removed_fraction"]
    assert metrics["decontaminate"]["knn"]["verify"] is True
    result = pd.read_parquet(root / "decontam" / "decontam.parquet")
    assert result.loc[result["removed"], "matched_eval_id"].notna().all()


def test_retrieval_raises_the_in_domain_share(curated):
    _, _root, metrics = curated
    q = metrics["retrieve"]["quality"]
    assert metrics["retrieve"]["mode"] == "sample"
    assert q["curated_in_domain_share"] > q["pool_in_domain_share"] + 0.03, q
    assert metrics["retrieve"]["pool_embeddings_reused_from_dedup"] is True


def test_shards_hold_exactly_the_curated_set(curated):
    _, root, metrics = curated
    curated_keys = set(pd.read_parquet(root / "retrieve" / "curated.parquet")["sha256"])
    assert metrics["shards"]["samples"] == len(curated_keys) == metrics["retrieve"]["curated"]


def test_embeddings_are_reused_on_rerun(curated):
    params, root, _ = curated
    run_dedup(params)
    m = json.loads((root / "reports" / "metrics" / "dedup.json").read_text())
    assert m["embedding"]["computed"] == 0 and m["embedding"]["reused"] == m["images"]


def test_mode_chooser_follows_the_seed_set_size():
    assert choose_mode("auto", 5, 10) == "cluster"
    assert choose_mode("auto", 10, 10) == "sample"
    assert choose_mode("cluster", 10**7, 10) == "cluster"
    assert choose_mode("auto", 0, 10) == "balanced" and choose_mode("balanced", 500, 10) == "balanced"
    with pytest.raises(ValueError, match="seed set is empty"):
        choose_mode("sample", 0, 10)


def test_an_empty_seed_set_curates_the_pool_by_balanced_sampling(curated, tmp_path):
    """No curated seed images (a user's own folder): the stage keeps `balanced_fraction` of the pool, evenly over
    its clusters, checked by the same GX suite, with the same quality metrics against the ground truth."""
    params, _, _ = curated
    empty = tmp_path / "seed.csv"
    empty.write_text("id,path\n")
    p = params.model_copy(deep=True)
    p.retrieve.seed_index, p.retrieve.out, p.reports = str(empty), str(tmp_path / "out"), str(tmp_path / "r")
    curated_frame = run_retrieve(p)
    m = json.loads((tmp_path / "r" / "metrics" / "retrieve.json").read_text())
    assert m["mode"] == "balanced" and m["seeds"] == 0 and m["seed_embedding"] is None
    assert m["curated"] == len(curated_frame) == round(p.retrieve.balanced_fraction * m["pool"])
    assert (curated_frame["method"] == "balanced").all() and curated_frame["sha256"].is_unique
    assert m["algo"]["largest_cluster_share_kept"] <= m["algo"]["largest_cluster_share_pool"]
    assert 0 < m["quality"]["curated_in_domain_share"] <= 1


def test_corrupt_embeddings_fail_the_boundary_check(curated, tmp_path):
    """A damaged hand-over (NaN vectors in dedup's embeddings) stops decontaminate with the expectation name."""
    params, root, _ = curated
    import shutil

    bad_dedup = tmp_path / "dedup"
    shutil.copytree(root / "dedup", bad_dedup)
    with np.load(bad_dedup / "embeddings.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["vectors"] = arrays["vectors"].copy()
    arrays["vectors"][3] = np.nan
    np.savez(bad_dedup / "embeddings.npz", **arrays)
    params.decontaminate.dedup = str(bad_dedup)
    params.decontaminate.out = str(tmp_path / "out")
    try:
        with pytest.raises(DataQualityError, match="pool_embeddings: expect_column_values_to_be_in_set"):
            run_decontaminate(params)
    finally:
        params.decontaminate.dedup = str(root / "dedup")
        params.decontaminate.out = str(root / "decontam")
    assert not (tmp_path / "out" / "decontam.parquet").exists()


def test_dedup_quality_tells_the_crawls_own_pixel_copies_from_look_alikes():
    """Two crawl items the sidecar calls distinct but whose pixels are the same picture (Fashion-MNIST has such) are
    counted apart from a look-alike lost; the plain precision still counts both as wrong."""
    from PIL import Image

    from tasks.curation_scores import dedup_quality, grey_pixel_ncc

    a, b, b_like, c = np.random.default_rng(0).integers(0, 255, (4, 28, 28), dtype=np.uint8)
    a_copy = np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)  # the same picture, a little brighter
    images = {"a": a, "a_copy": a_copy, "b": b, "b_like": b_like, "c": c, "c_dup": c}
    truth = pd.DataFrame({"sha256": list(images), "kind": ["in_domain"] * 5 + ["near_duplicate"],
                          "identity": ["a", "a2", "b", "b2", "c", "c"]}).set_index("sha256")
    dedup = pd.DataFrame({"key": list(images), "component": [0, 0, 1, 1, 2, 2],
                          "kept": [True, False, True, False, True, False],
                          "duplicate_of": [None, "a", None, "b", None, "c"]})
    ncc = lambda k, r: grey_pixel_ncc(Image.fromarray(images[k]), Image.fromarray(images[r]))
    q = dedup_quality(dedup, truth, ncc)
    assert q["removed"] == 3 and q["removed_correctly"] == 1 and q["distinct_images_wrongly_removed"] == 2
    assert q["precision"] == round(1 / 3, 4)
    assert q["wrongly_removed_pixel_near_copies"] == 1 and q["precision_pixel_copies_counted"] == round(2 / 3, 4)
    assert "wrongly_removed_pixel_near_copies" not in dedup_quality(dedup, truth)
