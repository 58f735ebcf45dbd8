import math

import pytest
import torch

from dinov2_core.eval.knn import KNN_KS, KNN_TEMPERATURE, effective_ks, knn_classify, knn_vote_scores


def test_official_defaults():
    assert tuple(KNN_KS) == (10, 20, 100, 200)
    assert KNN_TEMPERATURE == 0.07


def test_one_hot_features_give_perfect_accuracy():
    num_classes = 10
    train_y = torch.arange(num_classes).repeat_interleave(25)  # 250 train samples
    test_y = torch.arange(num_classes).repeat(3)
    train_x = torch.nn.functional.one_hot(train_y, num_classes).float()
    test_x = torch.nn.functional.one_hot(test_y, num_classes).float()
    res = knn_classify(train_x, train_y, test_x, test_y)
    assert sorted(res) == [10, 20, 100, 200]
    for k, r in res.items():
        assert r["top1"] == pytest.approx(1.0), k
        assert r["top5"] == pytest.approx(1.0), k


def _weighted_case(scale_far: float = 1.0):
    # Query at angle 0. One class-0 neighbour at cos-sim 1.0, two class-1 neighbours at cos-sim 0.8.
    # Majority vote (k=3) says class 1; exp(sim / 0.07) weighting says class 0.
    q = torch.tensor([[1.0, 0.0]])
    train_x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]])
    train_x[1:] *= scale_far  # norms must not matter: features are L2-normalised
    train_y = torch.tensor([0, 1, 1])
    return train_x, train_y, q


def test_weighted_vote_beats_majority_at_official_temperature():
    train_x, train_y, q = _weighted_case(scale_far=50.0)
    res = knn_classify(train_x, train_y, q, torch.tensor([0]), ks=(3,), num_classes=2)
    assert res[3]["top1"] == 1.0  # weighted answer is class 0; plain majority would give class 1
    votes = knn_vote_scores(train_x, train_y, q, ks=(3,), num_classes=2)[3][0]
    assert (votes[1] / votes[0]).item() == pytest.approx(2 * math.exp((0.8 - 1.0) / 0.07), rel=1e-4)


def test_temperature_is_used():
    train_x, train_y, q = _weighted_case()
    # With T = 1 the two 0.8-similar neighbours outweigh the single exact match: 2e^0.8 > e^1.
    res = knn_classify(train_x, train_y, q, torch.tensor([1]), ks=(3,), temperature=1.0, num_classes=2)
    assert res[3]["top1"] == 1.0


def test_k_is_capped_at_train_size_and_deduplicated():
    assert effective_ks((10, 20, 100, 200), 15) == [10, 15]
    torch.manual_seed(0)
    train_x, train_y = torch.randn(15, 4), torch.arange(15) % 3
    res = knn_classify(train_x, train_y, torch.randn(6, 4), torch.arange(6) % 3)
    assert sorted(res) == [10, 15]
    votes = knn_vote_scores(train_x, train_y, torch.randn(6, 4), ks=(200,), num_classes=3)
    assert list(votes) == [15]


def test_top5_only_with_more_than_five_classes():
    torch.manual_seed(0)
    for num_classes, has_top5 in ((5, False), (6, True)):
        train_y = torch.arange(num_classes).repeat(4)
        train_x = torch.randn(len(train_y), 8)
        res = knn_classify(train_x, train_y, train_x[:5], train_y[:5], ks=(10,))
        assert ("top5" in res[10]) is has_top5


def test_chunking_does_not_change_results():
    torch.manual_seed(1)
    train_x, train_y = torch.randn(120, 16), torch.randint(0, 7, (120,))
    test_x, test_y = torch.randn(37, 16), torch.randint(0, 7, (37,))
    a = knn_classify(train_x, train_y, test_x, test_y, chunk_size=5)
    b = knn_classify(train_x, train_y, test_x, test_y, chunk_size=1000)
    assert a == b
