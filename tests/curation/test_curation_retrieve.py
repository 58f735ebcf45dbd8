import numpy as np
import pytest

from dinov2_core.curation.retrieve import (
    balanced_quota,
    balanced_sampling,
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


def _imbalanced(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One dense mode (900 images around one centre) and ten small ones (20 each), well separated."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(11, 32)))
    mode = np.r_[np.zeros(900, dtype=int), np.repeat(np.arange(1, 11), 20)]
    x = unit(centres[mode] + 0.15 * rng.normal(size=(len(mode), 32)) / np.sqrt(32))
    return x, np.array([f"img{i:05d}" for i in range(len(x))]), mode


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_sampling_evens_out_a_dense_mode(seed):
    """Seedless curation keeps the long tail: from a pool that is 82 % one mode, a 110-image sample holds every
    small mode and about as many of each as of the dense one (uniform sampling would keep ~90 of the dense)."""
    x, keys, mode = _imbalanced(seed)
    df, metrics = balanced_sampling(x, keys, n_clusters=11, target=110, seed=seed)  # 44 fine clusters
    assert len(df) == 110 and df.key.is_unique and (df.method == "balanced").all()
    kept = np.bincount(mode[np.searchsorted(keys, df.key.to_numpy())], minlength=11)
    assert kept.min() >= 8 and kept[0] <= 13, kept  # every mode ~10 (20 seeds: exactly 10), not ~90 dense
    assert metrics["largest_cluster_share_pool"] > 0.8 and metrics["largest_cluster_share_kept"] < 0.25
    again, _ = balanced_sampling(x, keys, n_clusters=11, target=110, seed=seed)
    assert again.equals(df)  # deterministic given the seed
    flat, _ = balanced_sampling(x, keys, n_clusters=44, fine_per_cluster=1, target=110, seed=seed)
    flat_kept = np.bincount(mode[np.searchsorted(keys, flat.key.to_numpy())], minlength=11)
    assert flat_kept[0] > 2 * kept[0], (flat_kept, kept)  # one level: the dense mode's many clusters each get a quota


def test_balanced_quota_water_fills():
    sizes = np.array([900, 20, 20, 5])
    q = balanced_quota(sizes, 60)
    assert q == 18 and np.minimum(sizes, q).sum() <= 60 < np.minimum(sizes, q + 1).sum()
    assert balanced_quota(sizes, 10_000) == 900 and balanced_quota(sizes, 0) == 0


def test_balanced_sampling_never_exceeds_the_pool():
    x, keys, _ = _imbalanced(0)
    df, _ = balanced_sampling(x, keys, n_clusters=5, target=5000, seed=0)
    assert len(df) == len(keys) and df.key.is_unique
