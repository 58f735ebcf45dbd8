"""The k-NN monitor of training: a labelled folder (``train.csv`` / ``test.csv`` with ``path,label``) preprocessed
once, k-NN top-1 of any backbone on it, linear CKA between backbones, and the random-init baseline they are
compared against. Used during training (k-NN vs images seen) and after it (trained vs random init)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image

from ..config import MonitorConfig
from ..models import build_backbone
from .features import EvalTransformConfig
from .knn import KnnProbe, knn_classify


def labelled_split(eval_dir: Path, split: str, n: int) -> pd.DataFrame:
    """The first ``n`` rows of ``<eval_dir>/<split>.csv`` (``path`` relative to the folder, integer ``label``)."""
    return pd.read_csv(eval_dir / f"{split}.csv").iloc[:n]


def knn_probe(monitor: MonitorConfig, img_size: int, patch_size: int) -> KnnProbe | None:
    """The labelled monitor split, preprocessed once (official eval transform at the training resolution); None when
    there is no labelled set."""
    if not monitor.eval_dir or not (Path(monitor.eval_dir) / "train.csv").exists():
        return None
    eval_dir = Path(monitor.eval_dir)
    tf = EvalTransformConfig(resize_size=img_size, crop_size=img_size, patch_size=patch_size).build()

    def load(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        table = labelled_split(eval_dir, split, n)
        images = torch.stack([tf(Image.open(eval_dir / p).convert("RGB")) for p in table["path"]])
        return images, torch.as_tensor(table["label"].to_numpy().copy())

    return KnnProbe(*load("train", monitor.n_train), *load("test", monitor.n_test), k=monitor.k)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) between two feature sets of the same images (any widths)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    hsic = (x.T @ y).pow(2).sum()
    return float(hsic / ((x.T @ x).pow(2).sum().sqrt() * (y.T @ y).pow(2).sum().sqrt()))


def knn_monitor(monitor: MonitorConfig, models: dict[str, Any], img_size: int, patch_size: int) -> dict[str, Any]:
    """k-NN top-1 of each model on the labelled split, plus linear CKA of every model against the first one."""
    start = time.perf_counter()
    probe = knn_probe(monitor, img_size, patch_size)
    if probe is None:
        return {"skipped": f"no labelled eval set at {monitor.eval_dir!r}"}
    out: dict[str, Any] = {"eval_dir": str(monitor.eval_dir), "k": monitor.k, "img_size": img_size}
    test_feats = {}
    torch_threads = torch.get_num_threads()
    for name, model in models.items():
        xtr, xte = probe.features(model, probe.train_images), probe.features(model, probe.test_images)
        res = knn_classify(xtr, probe.train_labels, xte, probe.test_labels, ks=(monitor.k,))
        out[f"{name}_top1"] = round(float(next(iter(res.values()))["top1"]), 4)
        test_feats[name] = xte
    ref = next(iter(test_feats))
    for name, feats in test_feats.items():
        if name != ref:
            out[f"{name}_cka_vs_{ref}"] = round(linear_cka(feats, test_feats[ref]), 4)
    out["n_train"], out["n_test"] = len(probe.train_labels), len(probe.test_labels)
    out["seconds"] = round(time.perf_counter() - start, 2)
    torch.set_num_threads(torch_threads)
    return out


def random_backbone(backbone_cfg, seed: int = 0, layerscale: float | None = 1.0) -> torch.nn.Module:
    """The random-init baseline. LayerScale starts at 1.0 (the hub constructors' default) rather than the training
    init (1e-5): with 1e-5 the blocks are near-identity at init, every image gets the same CLS token and k-NN sits
    at chance, which would make a meaninglessly weak baseline."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = replace(backbone_cfg, layerscale=layerscale) if backbone_cfg.layerscale else backbone_cfg
        return build_backbone(cfg, with_drop_path=False).eval()


__all__ = ["MonitorConfig", "knn_monitor", "knn_probe", "labelled_split", "linear_cka", "random_backbone"]
