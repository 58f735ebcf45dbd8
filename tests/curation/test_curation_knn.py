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


def test_sharded_search_is_the_single_index_search():
    """IndexShards over 3 flat shards: the same neighbours, ids and similarities as one flat index."""
    rng = np.random.default_rng(5)
    pool = unit(rng.normal(size=(3001, 32)))
    queries = unit(rng.normal(size=(50, 32)))
    one = knn_search(pool, k=8)
    three = knn_search(pool, k=8, index=build_index(pool, shards=3))
    assert three.params == {"shards": 3} and three.index_type == "flat"
    assert (one.ids == three.ids).all() and np.allclose(one.sims, three.sims, atol=1e-6)
    q1, q3 = knn_search(pool, queries, k=8), knn_search(pool, queries, k=8, index=build_index(pool, shards=3))
    assert (q1.ids == q3.ids).all()


def test_ivf_pq_from_a_factory_string_reports_its_recall_against_exact_search():
    """IVF-PQ (4-bit codes here, to keep the test quick: recall 0.26-0.29 over seeds) from a factory string, and
    the stage-metrics recall@k equals the overlap with exact search computed independently."""
    x = clustered(5000, 64, n_centres=40, spread=0.3, seed=4)
    index = build_index(x, factory="IVF{nlist},PQ32x4", nlist=32, nprobe=8)
    res = knn_search(x, k=10, index=index, recall_sample=500)
    assert res.index_type == "ivfpq" and res.params["nlist"] == 32 and res.params["recall_queries"] == 500
    exact = knn_search(x, k=10)
    rows = np.sort(np.random.default_rng(0).choice(len(x), 500, replace=False))
    measured = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids[rows], exact.ids[rows])])
    assert res.params["recall_at_k"] == pytest.approx(measured, abs=1e-3)
    assert 0.15 < res.params["recall_at_k"] < 0.6  # compressed codes: approximate, and 100x chance (0.002)
    sharded = knn_search(x, k=10, index=build_index(x, factory="IVF{nlist},PQ32x4", nlist=16, nprobe=8, shards=2),
                         recall_sample=200)
    assert sharded.params["shards"] == 2 and sharded.params["recall_at_k"] > 0.1  # 0.20-0.21 over seeds
    assert "recall_at_k" not in exact.params  # exact search: nothing to measure


def test_without_a_gpu_the_index_stays_on_the_cpu():
    import faiss

    index = build_index(clustered(500, 8, 5, 0.2), use_gpu=True)
    assert faiss.get_num_gpus() == 0 and type(index).__name__ == "IndexFlatIP"
