import pytest
import torch

from dinov2_core.eval.features import ExtractedFeatures
from dinov2_core.eval.linear import LINEAR_LRS, linear_probe, stratified_split


def _clusters(n_per_class: int, num_classes: int, dim: int, seed: int) -> ExtractedFeatures:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, 4, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    cls = centers[y] + 0.3 * torch.randn(len(y), 4, dim, generator=g)
    patch_mean = torch.randn(len(y), 4, dim, generator=g)
    return ExtractedFeatures(cls=cls, patch_mean=patch_mean, targets=y)


def test_separable_features_reach_full_accuracy_and_grid_is_complete():
    train, val, test = (_clusters(n, 7, 8, s) for n, s in ((40, 0), (10, 1), (10, 2)))
    lrs = (0.01, 0.1)
    res = linear_probe(train, val, test, learning_rates=lrs, epochs=10, batch_size=64)
    assert len(res.grid) == 2 * 2 * len(lrs)  # {1, 4 blocks} x {cls, cls+avgpool} x lrs
    assert set(res.grid) == set(res.configs)
    assert res.val_top1 == res.grid[res.best_name] == max(res.grid.values())
    assert res.test_top1 >= 0.99
    assert res.test_top5 == pytest.approx(1.0)  # 7 classes -> top-5 reported
    d = res.to_dict()
    assert d["best"]["name"] == res.best_name and d["test_top1"] == res.test_top1


def _conflicting_splits():
    """Train: the label is carried by all 4 blocks. Val: only the last block agrees with the label
    (earlier blocks flipped). Test: only the earlier blocks agree (last block flipped).
    So the 1-block probe wins on val while the 4-block probe would win on test."""
    g = torch.Generator().manual_seed(0)

    def split(n, sign_last, sign_early):
        y = torch.arange(n) % 2
        s = (2 * y - 1).float()
        cls = 0.1 * torch.randn(n, 4, 2, generator=g)
        cls[:, -1, 0] += sign_last * s
        cls[:, :-1, 0] += sign_early * s[:, None]
        return ExtractedFeatures(cls=cls, patch_mean=torch.zeros(n, 4, 2), targets=y)

    return split(200, 1, 1), split(60, 1, -1), split(60, -1, 1)


def test_model_selection_uses_val_not_test():
    train, val, test = _conflicting_splits()
    kw = {"learning_rates": (0.1,), "avgpool_grid": (False,), "epochs": 5, "batch_size": 32}
    res = linear_probe(train, val, test, **kw)
    assert res.grid["blocks1_avgpool0_lr0.1"] > 0.95
    assert res.grid["blocks4_avgpool0_lr0.1"] < 0.05
    assert res.best_config.n_last_blocks == 1  # best on val ...
    assert res.test_top1 < 0.05  # ... even though it is the worst on test
    # Sanity of the construction: had we selected on the test split, the 4-block probe would win.
    cheat = linear_probe(train, test, test, **kw)
    assert cheat.best_config.n_last_blocks == 4 and cheat.test_top1 > 0.95


def test_deterministic_given_seed():
    train, val, test = (_clusters(n, 3, 4, s) for n, s in ((20, 0), (6, 1), (6, 2)))
    kw = {"learning_rates": (1e-3, 0.1), "epochs": 2, "batch_size": 16, "seed": 7}
    a, b = linear_probe(train, val, test, **kw), linear_probe(train, val, test, **kw)
    assert a.grid == b.grid
    assert torch.equal(a.classifier.weight, b.classifier.weight)


def test_official_lr_grid_and_stratified_split():
    assert len(LINEAR_LRS) == 13 and min(LINEAR_LRS) == 1e-5 and max(LINEAR_LRS) == 0.1
    labels = torch.arange(5).repeat_interleave(20)
    tr, va = stratified_split(labels, val_fraction=0.1, seed=0)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 100
    assert torch.bincount(labels[va]).tolist() == [2] * 5
    assert torch.equal(va, stratified_split(labels, 0.1, seed=0)[1])
