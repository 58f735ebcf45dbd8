import numpy as np
import pytest

from dinov2_core.curation.knn import build_index, knn_search

from ._util import clustered, unit


def test_self_search_excludes_self_even_with_exact_duplicates():
    rng = np.random.default_rng(0)
    x = unit(rng.normal(size=(200, 16)))
    x[10] = x[11] = x[12]  # three identical rows: ties with self
    res = knn_search(x, k=5)
    assert res.ids.shape == (200, 5) and res.sims.shape == (200, 5)
    assert not (res.ids == np.arange(200)[:, None]).any()
    assert set(res.ids[10, :2].tolist()) == {11, 12}
    assert np.allclose(res.sims[10, :2], 1.0, atol=1e-5)
    assert (np.diff(res.sims, axis=1) <= 1e-6).all()  # best first
    assert res.index_type == "flat" and res.queries_per_s > 0


def test_pool_vs_query_matches_brute_force():
    rng = np.random.default_rng(1)
    pool = unit(rng.normal(size=(500, 24)))
    queries = unit(rng.normal(size=(30, 24)))
    res = knn_search(pool, queries, k=7)
    brute = np.argsort(-(queries @ pool.T), axis=1)[:, :7]
    assert (res.ids == brute).all()
    assert np.allclose(res.sims, np.take_along_axis(queries @ pool.T, brute, 1), atol=1e-5)


def test_k_larger_than_pool_is_padded():
    x = unit(np.eye(3, 4))
    res = knn_search(x, k=5)
    assert (res.ids[:, 2:] == -1).all()
    assert np.isneginf(res.sims[:, 2:]).all()


def test_exact_and_ivf_agree_on_clustered_data():
    x = clustered(6000, 32, n_centres=40, spread=0.3, seed=2)
    exact = knn_search(x, k=10, exact_threshold=10**9)
    ivf = knn_search(x, k=10, exact_threshold=1000, nlist=64, nprobe=8)
    assert exact.index_type == "flat" and ivf.index_type == "ivf"
    assert ivf.params == {"nlist": 64, "nprobe": 8}
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.ids, ivf.ids)])
    assert recall > 0.95
    assert not (ivf.ids == np.arange(len(x))[:, None]).any()


def test_index_choice_and_validation():
    x = clustered(2000, 8, 10, 0.2)
    assert type(build_index(x, exact_threshold=5000)).__name__ == "IndexFlatIP"
    assert "IVF" in type(build_index(x, exact_threshold=100)).__name__
    with pytest.raises(ValueError):
        knn_search(x, x[:, :4], k=3)
    with pytest.raises(ValueError):
        knn_search(x, k=0)
