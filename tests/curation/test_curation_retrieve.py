import numpy as np
import pytest

from dinov2_core.curation.retrieve import (
    cluster_based_retrieval,
    kmeans,
    retrieve,
    sample_based_retrieval,
)

from ._util import clustered, unit


@pytest.fixture(scope="module")
def pool():
    x = clustered(3000, 32, n_centres=12, spread=0.4, seed=3)
    return x, np.array([f"img{i:05d}" for i in range(len(x))])


def test_sample_based_returns_k_nearest_per_seed_deduplicated(pool):
    x, keys = pool
    seeds = np.vstack([x[10], x[10] * 0.999 + x[11] * 0.001, x[2000]])
    seeds = unit(seeds)
    df, metrics = sample_based_retrieval(x, keys, seeds, ["s0", "s1", "s2"], k=4)
    sims = seeds @ x.T
    expected = set()
    for row in sims:
        expected |= set(np.argsort(-row)[:4].tolist())
    assert set(df.key) == set(keys[list(expected)])
    assert df.key.is_unique and (df.method == "sample").all() and (df.cluster == -1).all()
    # every retrieved image records its most similar seed and that similarity
    for _, r in df.iterrows():
        i = int(r.key[3:])
        assert r.similarity == pytest.approx(sims[:, i].max(), abs=1e-5)
        assert r.seed_neighbour == ["s0", "s1", "s2"][int(np.argmax(sims[:, i]))]
    assert metrics["n_raw_hits"] == 12 and len(df) < 12  # s0 and s1 overlap


def test_sample_based_min_similarity(pool):
    x, keys = pool
    df = sample_based_retrieval(x, keys, x[:5], k=50, min_similarity=0.9).frame
    assert (df.similarity > 0.9).all()


def test_cluster_based_samples_only_seed_clusters_with_cap(pool):
    x, keys = pool
    centroids, labels = kmeans(x, 12, seed=0)
    seeds = x[[5, 6, 7]]
    seed_clusters = set(labels[[5, 6, 7]].tolist())
    df = cluster_based_retrieval(
        x, keys, seeds, n_clusters=12, per_cluster=40, seed=0, centroids=centroids, pool_labels=labels
    ).frame
    assert set(df.cluster) == seed_clusters
    assert df.groupby("cluster").size().max() <= 40
    assert df.key.is_unique and (df.method == "cluster").all()
    idx = df.key.str[3:].astype(int).to_numpy()
    assert (labels[idx] == df.cluster.to_numpy()).all()
    # no cap -> the whole clusters
    full = cluster_based_retrieval(
        x, keys, seeds, n_clusters=12, per_cluster=10**6, centroids=centroids, pool_labels=labels
    ).frame
    assert len(full) == np.isin(labels, list(seed_clusters)).sum()


def test_cluster_based_is_deterministic_given_seed(pool):
    x, keys = pool
    a = cluster_based_retrieval(x, keys, x[[1, 2000]], n_clusters=12, per_cluster=25, seed=7).frame
    b = cluster_based_retrieval(x, keys, x[[1, 2000]], n_clusters=12, per_cluster=25, seed=7).frame
    c = cluster_based_retrieval(x, keys, x[[1, 2000]], n_clusters=12, per_cluster=25, seed=8).frame
    assert a.equals(b)
    assert set(a.key) != set(c.key)


def test_chooser_switches_on_seed_set_size(pool):
    x, keys = pool
    small = retrieve(x, keys, x[:5], large_seed_set=100, n_clusters=12, per_cluster=10).frame
    large = retrieve(x, keys, x[:200], large_seed_set=100, k=4).frame
    assert (small.method == "cluster").all() and (large.method == "sample").all()
    assert len(large) <= 800


def test_empty_inputs_give_empty_frames(pool):
    x, keys = pool
    assert len(sample_based_retrieval(x, keys, np.zeros((0, 32), np.float32)).frame) == 0
    empty = cluster_based_retrieval(x, keys, np.zeros((0, 32), np.float32), n_clusters=4)
    assert list(empty.frame.columns) == [
        "key",
        "seed_neighbour",
        "similarity",
        "cluster",
        "method",
    ]
