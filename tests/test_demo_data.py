"""The demo-data stage: real images, planted cases with ground truth, deterministic from a seed."""

import hashlib
from pathlib import Path

import pandas as pd
from PIL import Image

from tasks.demo_data import BROKEN_KINDS, build_demo_data, decompression_bomb_png


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_sizes_and_planted_kinds(demo_dir, small_demo_sizes):
    SMALL_DEMO = small_demo_sizes
    gt = pd.read_parquet(demo_dir / "demo" / "ground_truth.parquet")
    kinds = gt["kind"].value_counts().to_dict()
    assert kinds["in_domain"] == SMALL_DEMO["n_in_domain"]
    assert kinds["near_duplicate"] == SMALL_DEMO["n_near_duplicates"]
    assert kinds["exact_duplicate"] == SMALL_DEMO["n_exact_duplicates"]
    assert kinds["eval_copy"] == SMALL_DEMO["n_eval_copies"]
    assert set(BROKEN_KINDS) <= set(gt["broken_kind"])
    manifest = pd.read_csv(demo_dir / "demo" / "crawl" / "manifest.csv")
    assert manifest["url"].tolist() == gt["url"].tolist()
    # Eval copies point at real eval test ids; seed and eval sets are disjoint Fashion-MNIST items.
    test_ids = set(pd.read_csv(demo_dir / "demo" / "eval" / "classification" / "test.csv")["id"])
    assert set(gt.loc[gt["kind"] == "eval_copy", "original"]) <= test_ids
    seed = pd.read_csv(demo_dir / "demo" / "seed" / "seed.csv")
    assert len(seed) == SMALL_DEMO["n_seed"] and seed["label"].between(0, 9).all()


def test_in_domain_items_are_real_fashion_mnist(demo_dir):
    gt = pd.read_parquet(demo_dir / "demo" / "ground_truth.parquet")
    row = gt[gt["kind"] == "in_domain"].iloc[0]
    img = Image.open(demo_dir / "demo" / "crawl" / row["url"])
    assert img.size == (28, 28) and img.mode == "L"
    assert 0 <= row["label"] <= 9


def test_segmentation_masks_match_images(demo_dir):
    seg = demo_dir / "demo" / "eval" / "segmentation"
    index = pd.read_csv(seg / "train.csv")
    img = Image.open(seg / index.loc[0, "image"])
    mask = Image.open(seg / index.loc[0, "mask"])
    assert img.size == mask.size and img.mode == "RGB" and mask.mode == "L"
    values = set(mask.getdata())
    assert 0 in values and len(values) == 2 and max(values) <= 10  # background + exactly one item class


def test_deterministic_from_seed(tmp_path, small_params_factory, demo_dir):
    params = small_params_factory(tmp_path)
    build_demo_data(params.demo_data)
    assert _tree_digest(tmp_path / "demo") == _tree_digest(demo_dir / "demo")


def test_other_seed_gives_other_data(tmp_path, small_params_factory, demo_dir):
    params = small_params_factory(tmp_path, ["demo_data.seed=1"])
    build_demo_data(params.demo_data)
    a = pd.read_parquet(tmp_path / "demo" / "ground_truth.parquet")
    b = pd.read_parquet(demo_dir / "demo" / "ground_truth.parquet")
    assert a["sha256"].tolist() != b["sha256"].tolist()


def test_bomb_is_small_on_disk_but_huge_in_pixels():
    data = decompression_bomb_png(30000)
    assert len(data) < 500_000
    Image.MAX_IMAGE_PIXELS, saved = None, Image.MAX_IMAGE_PIXELS
    try:
        import io

        assert Image.open(io.BytesIO(data)).size == (30000, 30000)
    finally:
        Image.MAX_IMAGE_PIXELS = saved
