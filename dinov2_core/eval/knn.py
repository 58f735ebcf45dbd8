"""Weighted k-NN classification on frozen features (official DINOv2 / DINO protocol).

Features are L2-normalised, neighbours ranked by cosine similarity, and each of the k nearest
neighbours votes for its class with weight exp(sim / T).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from .metrics import topk_accuracy

KNN_KS = (10, 20, 100, 200)  # official eval/knn.py default nb_knn
KNN_TEMPERATURE = 0.07  # official eval/knn.py default temperature


def effective_ks(ks: Iterable[int], n_train: int) -> list[int]:
    """Cap every k at the train-set size and drop the duplicates this creates."""
    if n_train < 1:
        raise ValueError("empty train set")
    out = sorted({min(int(k), n_train) for k in ks})
    if not out or out[0] < 1:
        raise ValueError(f"k must be >= 1, got {list(ks)}")
    return out


def knn_vote_scores(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    *,
    ks: Iterable[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """Per (capped) k, the class vote mass [Q, C]: sum over the k nearest of exp(sim / T).

    Queries are processed in chunks of chunk_size so memory stays at chunk_size x N_train.
    Votes are computed as exp((sim - max_sim) / T): a per-query constant factor (the official
    code divides by the softmax normaliser instead), so rankings are identical and it never overflows.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train features and labels have different lengths")
    ks = effective_ks(ks, train_features.shape[0])
    max_k = ks[-1]
    train_labels = train_labels.long()
    if num_classes is None:
        num_classes = int(train_labels.max().item()) + 1
    train_t = F.normalize(train_features.float(), dim=1).T.contiguous()  # [D, N]
    labels_row = train_labels.to(train_t.device)
    chunks: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, query_features.shape[0], chunk_size):
        q = F.normalize(query_features[start : start + chunk_size].float().to(train_t.device), dim=1)
        sims, idx = (q @ train_t).topk(max_k, dim=1, largest=True, sorted=True)
        nbr_labels = labels_row[idx]  # [q, max_k]
        weights = torch.exp((sims - sims[:, :1]) / temperature)
        for k in ks:
            votes = torch.zeros(q.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
            votes.scatter_add_(1, nbr_labels[:, :k], weights[:, :k])
            chunks[k].append(votes.cpu())
    if not chunks[ks[0]]:
        return {k: torch.zeros(0, num_classes) for k in ks}
    return {k: torch.cat(v) for k, v in chunks.items()}


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    ks: Iterable[int] = KNN_KS,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, dict[str, float]]:
    """k-NN accuracy for each k: {k: {"top1": acc, "top5": acc}} (fractions in [0, 1]).

    Keys are the effective k (capped at the train size, deduplicated). "top5" is present only
    when there are more than 5 classes, where it is informative.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    scores = knn_vote_scores(
        train_features,
        train_labels,
        test_features,
        ks=ks,
        temperature=temperature,
        num_classes=num_classes,
        chunk_size=chunk_size,
    )
    report_ks = (1, 5) if num_classes > 5 else (1,)
    results: dict[int, dict[str, float]] = {}
    for k, s in scores.items():
        acc = topk_accuracy(s, test_labels.long(), report_ks)
        results[k] = {f"top{kk}": v for kk, v in acc.items()}
    return results


class KnnProbe:
    """k-NN top-1 of a backbone's final CLS token on a fixed labelled split, with the images preprocessed once, so
    that it is cheap enough to run many times during training (``knn_vs_images_seen``)."""

    def __init__(self, train_images: Tensor, train_labels: Tensor, test_images: Tensor, test_labels: Tensor, *,
                 k: int = 20, temperature: float = KNN_TEMPERATURE, batch_size: int = 256) -> None:
        self.train_images, self.train_labels = train_images, train_labels.long()
        self.test_images, self.test_labels = test_images, test_labels.long()
        self.k, self.temperature, self.batch_size = int(k), temperature, batch_size

    @torch.inference_mode()
    def features(self, model: torch.nn.Module, images: Tensor) -> Tensor:
        was_training = model.training
        model.eval()
        try:
            out = [model.forward_features(images[i: i + self.batch_size])["x_norm_clstoken"].float()
                   for i in range(0, len(images), self.batch_size)]
        finally:
            model.train(was_training)
        return torch.cat(out)

    def __call__(self, model: torch.nn.Module) -> float:
        res = knn_classify(self.features(model, self.train_images), self.train_labels,
                           self.features(model, self.test_images), self.test_labels, ks=(self.k,),
                           temperature=self.temperature)
        return float(next(iter(res.values()))["top1"])
