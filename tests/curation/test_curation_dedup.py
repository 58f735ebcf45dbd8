import numpy as np
import pandas as pd
import pytest

from dinov2_core.curation.dedup import deduplicate, pick_representatives

from ._util import unit


def _groups(rng, n_groups, size, d=32, noise=0.01):
    """n_groups tight clusters of `size` near-identical vectors, groups mutually far apart."""
    centres = unit(rng.normal(size=(n_groups, d)))
    x = np.repeat(centres, size, axis=0) + noise * rng.normal(size=(n_groups * size, d)) / np.sqrt(d)
    return unit(x)


def test_keeps_largest_resolution_then_lowest_key():
    rng = np.random.default_rng(0)
    x = _groups(rng, 3, 3)
    keys = [
        "c",
        "a",
        "b",  # group 0: same resolution -> lowest key "a"
        "f",
        "d",
        "e",  # group 1: "f" has the largest resolution
        "h",
        "g",
        "i",
    ]  # group 2: "h" and "i" tie on resolution -> "h"
    res = np.array([10, 10, 10, 10, 10, 99, 50, 40, 50])
    res[3] = 500  # "f"
    df, metrics = deduplicate(x, keys, res, k=4, threshold=0.9)
    kept = set(df.loc[df.kept, "key"])
    assert kept == {"a", "f", "h"}
    by_key = df.set_index("key")
    assert by_key.loc["c", "duplicate_of"] == "a" and by_key.loc["e", "duplicate_of"] == "f"
    assert by_key.loc["i", "duplicate_of"] == "h"
    assert by_key.loc["a", "duplicate_of"] is None
    assert (df.component_size == 3).all()
    assert metrics["n_removed"] == 6


def test_result_independent_of_input_order():
    rng = np.random.default_rng(1)
    x = _groups(rng, 20, 4)
    keys = np.array([f"{i:04x}" for i in rng.permutation(80)])
    res = rng.integers(1, 4, size=80) * 100
    a = deduplicate(x, keys, res, k=8, threshold=0.9).frame.set_index("key")
    perm = rng.permutation(80)
    b = deduplicate(x[perm], keys[perm], res[perm], k=8, threshold=0.9).frame.set_index("key")
    b = b.loc[a.index]
    assert (a.kept == b.kept).all()
    assert (a.duplicate_of.fillna("") == b.duplicate_of.fillna("")).all()
    assert a.kept.sum() == 20


def test_similarity_column_and_threshold():
    x = unit(np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]))  # cos(0,1)=0.8, cos(1,2)=0.6, cos(0,2)=0
    df = deduplicate(x, ["k0", "k1", "k2"], k=2, threshold=0.7).frame
    assert df.component.tolist() == [0, 0, 1]
    assert df.kept.tolist() == [True, False, True]
    assert df.similarity[1] == pytest.approx(0.8, abs=1e-6)  # removed: cosine to its representative
    assert df.similarity[0] == pytest.approx(0.8, abs=1e-6)  # kept: strongest edge
    assert np.isnan(df.similarity[2])  # singleton
    # chains: at 0.5 all three are linked; k2 is removed although cos(k2, rep k0) = 0
    df = deduplicate(x, ["k0", "k1", "k2"], k=2, threshold=0.5).frame
    assert df.kept.tolist() == [True, False, False]
    assert df.similarity[2] == pytest.approx(0.0, abs=1e-6)


def test_no_duplicates_keeps_everything_and_validates_keys():
    rng = np.random.default_rng(2)
    x = unit(rng.normal(size=(50, 64)))
    df = deduplicate(x, [str(i) for i in range(50)], threshold=0.9).frame
    assert df.kept.all() and df.duplicate_of.isna().all()
    with pytest.raises(ValueError):
        deduplicate(x, ["same"] * 50, threshold=0.9)
    assert len(deduplicate(np.zeros((0, 4), np.float32), [], threshold=0.9).frame) == 0
    single = deduplicate(x[:1], ["only"], threshold=0.9).frame
    assert single.kept.tolist() == [True]


def test_pick_representatives_directly():
    labels = np.array([0, 0, 1, 1, 1])
    reps = pick_representatives(labels, ["b", "a", "z", "y", "x"], np.array([1, 1, 5, 9, 9]))
    assert reps.tolist() == [1, 1, 4, 4, 4]  # ("a" beats "b"; "x" beats "y" at equal resolution)
    assert isinstance(pd.Series(reps).iloc[0], (int, np.integer))


def test_view_edges_link_an_image_to_the_one_its_view_matches():
    rng = np.random.default_rng(4)
    x = unit(rng.normal(size=(30, 16)))
    views = np.zeros((2, 30, 16), np.float32)
    views[1, 5] = x[9]  # a view of image 5 is image 9 (9 is a crop of 5)
    views[0, 7] = x[7]  # a view matching its own image is not an edge
    plain = deduplicate(x, [f"k{i}" for i in range(30)], threshold=0.9).frame
    viewed, metrics = deduplicate(x, [f"k{i}" for i in range(30)], threshold=0.9, views=views)
    assert plain.kept.all()
    assert viewed.component[5] == viewed.component[9] and viewed.kept.sum() == 29
    assert metrics["n_view_edges"] == 1 and metrics["n_views"] == 2
    with pytest.raises(ValueError):
        deduplicate(x, [f"k{i}" for i in range(30)], threshold=0.9, views=views[:, :10])
