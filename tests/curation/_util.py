"""Helpers shared by the curation tests."""

from __future__ import annotations

import numpy as np


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(n: int, d: int, n_centres: int, spread: float, seed: int = 0) -> np.ndarray:
    """Unit vectors scattered around random centres (an easy case for IVF and k-means)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_centres, d)))
    lab = rng.integers(n_centres, size=n)
    return unit(centres[lab] + spread * rng.normal(size=(n, d)) / np.sqrt(d))
