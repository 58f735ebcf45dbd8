"""Shared fixtures: real Fashion-MNIST (skipped when the dataset is not installed) and small embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.copy_detection_corpora import FASHION_MNIST_ROOT, load_fashion_mnist


@pytest.fixture(scope="session")
def fashion_train() -> np.ndarray:
    if not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found under {FASHION_MNIST_ROOT}")
    images, _ = load_fashion_mnist(split="train")
    return images
