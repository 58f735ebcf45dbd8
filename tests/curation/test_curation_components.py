from collections import deque

import numpy as np
import pytest

from dinov2_core.curation.components import (
    component_sizes,
    components_from_knn,
    connected_components,
    knn_edges,
)


def bfs_components(n, edges):
    adj = [[] for _ in range(n)]
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    seen = [-1] * n
    c = 0
    for s in range(n):  # visiting in index order numbers components by their smallest member
        if seen[s] >= 0:
            continue
        seen[s] = c
        q = deque([s])
        while q:
            u = q.popleft()
            for v in adj[u]:
                if seen[v] < 0:
                    seen[v] = c
                    q.append(v)
        c += 1
    return np.array(seen)


def test_long_chain_is_one_component_and_isolated_points_stay_alone():
    n = 1000
    src = np.arange(0, 499)  # chain 0-1-...-499, nodes 500..999 isolated
    labels = connected_components(n, src, src + 1)
    assert (labels[:500] == 0).all()
    assert labels[500:].tolist() == list(range(1, 501))
    assert component_sizes(labels)[:2].tolist() == [500, 500]


def test_ids_are_ordered_by_smallest_member_and_independent_of_edge_order():
    edges = np.array([[7, 3], [9, 8], [3, 1], [5, 9]])
    a = connected_components(10, edges[:, 0], edges[:, 1])
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(edges))
    b = connected_components(10, edges[perm, 1], edges[perm, 0])
    assert a.tolist() == b.tolist()
    # components: {0}, {1,3,7}, {2}, {4}, {5,8,9}, {6}
    assert a.tolist() == [0, 1, 2, 1, 3, 4, 5, 1, 4, 4]


@pytest.mark.parametrize("seed", range(5))
def test_matches_bfs_on_random_graphs(seed):
    rng = np.random.default_rng(seed)
    n = 300
    m = int(rng.integers(50, 400))
    edges = rng.integers(n, size=(m, 2))
    got = connected_components(n, edges[:, 0], edges[:, 1])
    assert got.tolist() == bfs_components(n, edges.tolist()).tolist()


def test_knn_threshold_is_strict_and_compared_in_float32():
    ids = np.array([[1, 2], [0, 2], [0, 1]])
    sims = np.array([[0.6, 0.59], [0.6, 0.2], [0.59, 0.2]], dtype=np.float32)
    # 0.6 is not > 0.6: no edges at all
    assert components_from_knn(sims, ids, 0.6).tolist() == [0, 1, 2]
    # just below the boundary the 0-1 edge appears, the 0.59 edges do not
    assert components_from_knn(sims, ids, 0.5999).tolist() == [0, 0, 1]
    assert components_from_knn(sims, ids, 0.5).tolist() == [0, 0, 0]


def test_knn_edges_drop_padding_and_self_loops():
    ids = np.array([[0, 1, -1], [0, 1, -1]])
    sims = np.array([[1.0, 0.9, -np.inf], [0.9, 1.0, -np.inf]], dtype=np.float32)
    src, dst, sim = knn_edges(sims, ids, 0.5)
    assert sorted(zip(src.tolist(), dst.tolist())) == [(0, 1), (1, 0)]
    assert np.allclose(sim, 0.9)


def test_rejects_out_of_range_edges():
    with pytest.raises(ValueError):
        connected_components(3, [0], [3])
