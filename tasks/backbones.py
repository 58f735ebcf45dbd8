"""Backbones and embedders built from params: official-format checkpoints (local or s3://) or model-free.

An exported .pth may sit beside the training stages' `model.json` (hub constructor + kwargs), so a small
CPU-profile model (e.g. fewer blocks) rebuilds exactly; otherwise params name the constructor.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.embeddings import embedder_cache_id
from tasks.sections import EmbedderParams
from tasks.storage import Storage, scheme_of


def read_sidecar(weights: str, storage: Storage) -> dict[str, Any] | None:
    """The training stages' `model.json` beside an exported .pth: which hub constructor and kwargs rebuild it."""
    if scheme_of(weights) == "local":
        sidecar = str(Path(weights).parent / "model.json")
    else:
        sidecar = weights.rsplit("/", 1)[0] + "/model.json"
    if not storage.exists(sidecar):
        return None
    info = json.loads(storage.read_bytes(sidecar))
    hub = info.get("hub") or {}
    return {"hub": str(hub.get("constructor", "")).rsplit(".", 1)[-1] or None, "hub_kwargs": hub.get("kwargs", {})}


def load_backbone(hub: str, weights: str | None, hub_kwargs: dict[str, Any], storage: Storage) -> torch.nn.Module:
    """A dinov2_core hub model with `weights` (strict load); random init when weights is None."""
    from dinov2_core import hub as hubs

    if weights:
        sidecar = read_sidecar(weights, storage)
        if sidecar:
            hub = sidecar["hub"] or hub
            hub_kwargs = {**hub_kwargs, **sidecar["hub_kwargs"]}
    constructor = getattr(hubs, hub, None)
    if constructor is None or not hub.startswith("dinov2_"):
        raise ValueError(f"unknown hub constructor '{hub}' (e.g. dinov2_vits14, dinov2_vitb14_reg)")
    if weights is None:
        model = constructor(pretrained=False, **hub_kwargs)
    else:
        model = constructor(pretrained=True, weights=weights, opener=storage.open_read, **hub_kwargs)
    return model.eval()


def weights_digest(weights: str, storage: Storage) -> str:
    return hashlib.sha256(storage.read_bytes(weights)).hexdigest()[:16]


class _CopyDetection:
    def __init__(self, views: bool = False):
        from dinov2_core.curation import CopyDetectionEmbedder

        self._impl = CopyDetectionEmbedder(progress=False)
        info = self._impl.describe()
        n_views = len(info.params["view_crops"])
        self.views = views
        self.dim = info.dim * (n_views if views else 1)
        self.id = embedder_cache_id(f"{info.name}{'-views' if views else ''}", info.params)
        self.record = {"name": info.name, "dim": info.dim, **info.params}

    def embed(self, images):
        if not self.views:
            return self._impl.embed(images)
        v = self._impl.embed_views(images)  # [V, N, D] -> [N, V*D] so it caches like any embedding
        return np.ascontiguousarray(v.transpose(1, 0, 2).reshape(len(images), -1))


class _Backbone:
    def __init__(self, p: EmbedderParams, storage: Storage):
        from dinov2_core.curation import BackboneEmbedder

        model = load_backbone(p.hub, p.weights, p.hub_kwargs, storage)
        self._impl = BackboneEmbedder(model, image_size=p.image_size, batch_size=p.batch_size, progress=False,
                                      name=f"dinov2:{p.hub}")
        self.dim = int(model.embed_dim)
        info = self._impl.describe()
        digest = weights_digest(p.weights, storage)
        self.id = embedder_cache_id(f"dinov2-{p.hub}", {**info.params, "weights": digest})
        self.record = {"name": info.name, "dim": self.dim, "weights": p.weights, "weights_sha256_16": digest,
                       **info.params}

    def embed(self, images):
        return self._impl.embed(images)


def make_embedder(p: EmbedderParams, storage: Storage):
    """The params' embedder; `.id` keys the embedding cache, `.record` goes into the stage's metrics."""
    if p.kind == "copy-detection":
        return _CopyDetection()
    return _Backbone(p, storage)


def copy_detection_views_embedder():
    """Centre-crop views of the copy-detection descriptor, flattened, cached like any embedding."""
    return _CopyDetection(views=True)


def views_array(flat: np.ndarray, dim: int) -> np.ndarray:
    """[N, V*D] (cache layout) back to [V, N, D] (what dinov2_core.curation expects)."""
    n = flat.shape[0]
    return np.ascontiguousarray(flat.reshape(n, -1, dim).transpose(1, 0, 2))
