"""Linear probe on frozen features: the official grid-of-classifiers protocol, scaled down.

Every (feature variant, learning rate) classifier is trained simultaneously on the same
mini-batches; the best one is picked on a validation split and only then scored on test.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import ExtractedFeatures
from .metrics import topk_accuracy

# Official eval/linear.py defaults: learning-rate grid, {1, 4} last blocks x avgpool {False, True},
# SGD momentum 0.9, no weight decay, cosine decay to 0, lr scaled by batch_size / 256.
LINEAR_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
N_LAST_BLOCKS_GRID = (1, 4)
AVGPOOL_GRID = (False, True)
LINEAR_EPOCHS = 10  # official: 10 epochs
LINEAR_MOMENTUM = 0.9
LR_REFERENCE_BATCH = 256


@dataclass(frozen=True)
class LinearProbeConfig:
    """One grid point. lr is the base lr; the optimiser uses lr * batch_size / 256."""

    n_last_blocks: int
    avgpool: bool
    lr: float

    @property
    def name(self) -> str:
        return f"blocks{self.n_last_blocks}_avgpool{int(self.avgpool)}_lr{self.lr:g}"

    def as_dict(self) -> dict[str, Any]:
        return {"n_last_blocks": self.n_last_blocks, "avgpool": self.avgpool, "lr": self.lr}


@dataclass
class LinearProbeResult:
    """grid: config name -> val top-1 for every classifier; the chosen one is scored on test."""

    grid: dict[str, float]
    configs: dict[str, LinearProbeConfig]
    best_name: str
    best_config: LinearProbeConfig
    val_top1: float
    test_top1: float
    test_top5: float | None
    classifier: nn.Linear

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid_val_top1": dict(self.grid),
            "best": {"name": self.best_name, **self.best_config.as_dict()},
            "val_top1": self.val_top1,
            "test_top1": self.test_top1,
            "test_top5": self.test_top5,
        }


def stratified_split(labels: Tensor, val_fraction: float = 0.1, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic per-class split into (train_idx, val_idx), for datasets with no official val split.

    Every class with >= 2 samples contributes at least one val sample.
    """
    g = torch.Generator().manual_seed(seed)
    labels = labels.long().cpu()
    train_idx, val_idx = [], []
    for c in torch.unique(labels):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = min(len(idx) - 1, max(1, round(val_fraction * len(idx)))) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def _make_classifier(in_dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    lin = nn.Linear(in_dim, num_classes)
    nn.init.normal_(lin.weight, mean=0.0, std=0.01, generator=generator)  # official LinearClassifier init
    nn.init.zeros_(lin.bias)
    return lin


@torch.no_grad()
def _predict_scores(lin: nn.Linear, x: Tensor, batch_size: int = 4096) -> Tensor:
    return (
        torch.cat([lin(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
        if len(x)
        else x.new_zeros(0, lin.out_features)
    )


def linear_probe(
    train: ExtractedFeatures,
    val: ExtractedFeatures,
    test: ExtractedFeatures,
    *,
    num_classes: int | None = None,
    learning_rates: Iterable[float] = LINEAR_LRS,
    n_last_blocks_grid: Iterable[int] = N_LAST_BLOCKS_GRID,
    avgpool_grid: Iterable[bool] = AVGPOOL_GRID,
    epochs: int = LINEAR_EPOCHS,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> LinearProbeResult:
    """Train the whole grid in one pass over `train`, select on `val` (top-1), report on `test`.

    Labels come from each split's .targets ([N] ints). Ties on val go to the first config in grid
    order. Deterministic given `seed` (init and shuffling use a private generator).
    """
    for name, split in (("train", train), ("val", val), ("test", test)):
        if split.targets is None or split.targets.ndim != 1:
            raise ValueError(f"{name} split needs [N] class labels as targets")
    if len(val) == 0:
        raise ValueError("the validation split is empty: model selection needs it (never select on test)")
    if num_classes is None:
        num_classes = int(max(s.targets.max().item() for s in (train, val, test))) + 1
    variants = [(int(n), bool(a)) for n in n_last_blocks_grid for a in avgpool_grid]
    lrs = [float(lr) for lr in learning_rates]
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)

    train_x = {v: train.linear_input(*v).to(device) for v in variants}
    train_y = train.targets.long().to(device)
    configs: list[LinearProbeConfig] = []
    heads: list[nn.Linear] = []
    groups = []
    for v in variants:
        for lr in lrs:
            cfg = LinearProbeConfig(v[0], v[1], lr)
            lin = _make_classifier(train_x[v].shape[1], num_classes, g).to(device)
            configs.append(cfg)
            heads.append(lin)
            groups.append({"params": lin.parameters(), "lr": lr * batch_size / LR_REFERENCE_BATCH})
    optimizer = torch.optim.SGD(groups, momentum=LINEAR_MOMENTUM, weight_decay=0.0)
    n = len(train)
    total_steps = max(1, epochs * math.ceil(n / batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=0.0)

    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            y = train_y[idx]
            batch = {v: x[idx] for v, x in train_x.items()}
            # Sum of per-classifier losses: each head only gets gradients from its own term.
            loss = sum(
                F.cross_entropy(h(batch[(c.n_last_blocks, c.avgpool)]), y) for c, h in zip(configs, heads)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

    val_x = {v: val.linear_input(*v).to(device) for v in variants}
    val_y = val.targets.long()
    grid: dict[str, float] = {}
    for c, h in zip(configs, heads):
        grid[c.name] = topk_accuracy(
            _predict_scores(h, val_x[(c.n_last_blocks, c.avgpool)]).cpu(), val_y, (1,)
        )[1]
    best_i = max(range(len(configs)), key=lambda i: (grid[configs[i].name], -i))
    best, head = configs[best_i], heads[best_i]

    test_scores = _predict_scores(head, test.linear_input(best.n_last_blocks, best.avgpool).to(device)).cpu()
    ks = (1, 5) if num_classes > 5 else (1,)
    test_acc = topk_accuracy(test_scores, test.targets.long(), ks)
    return LinearProbeResult(
        grid=grid,
        configs={c.name: c for c in configs},
        best_name=best.name,
        best_config=best,
        val_top1=grid[best.name],
        test_top1=test_acc[1],
        test_top5=test_acc.get(5),
        classifier=head.cpu().eval(),
    )
