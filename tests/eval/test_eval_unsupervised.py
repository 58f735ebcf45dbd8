"""Label-free feature statistics: collapse and spread are told apart, neighbours never include the query."""

from __future__ import annotations

import torch

from dinov2_core.eval.unsupervised import feature_statistics, nearest_neighbours


def test_statistics_tell_collapsed_from_spread_features():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(500, 32, generator=g)
    collapsed = torch.ones(500, 32) + 0.01 * torch.randn(500, 32, generator=g)
    s, c = feature_statistics(spread), feature_statistics(collapsed)
    assert s["effective_rank"] > 25 and abs(s["mean_pair_cosine"]) < 0.02  # near the dimension, near orthogonal
    assert c["mean_pair_cosine"] > 0.99 and c["feature_std"] < 0.01 < s["feature_std"]
    # two clusters of images: their spread (after centring) is along one direction, an effective rank of about 1
    two = torch.cat([torch.eye(32)[:1].repeat(250, 1), torch.eye(32)[1:2].repeat(250, 1)])
    assert abs(feature_statistics(two + 1e-4 * torch.randn(500, 32, generator=g))["effective_rank"] - 1.0) < 0.2


def test_nearest_neighbours_are_the_most_similar_other_images():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.7]])
    nn = nearest_neighbours(x, n_queries=2, k=2)
    assert nn.tolist() == [[1, 4], [0, 4]]
