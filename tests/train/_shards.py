"""Tiny WebDataset shards of real Fashion-MNIST items, in the layout the shards stage writes."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")  # a GPU machine: carried


def fashion_items(n: int, split: str = "train", offset: int = 0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from tasks.demo_data import load_fashion_mnist

    images, labels = load_fashion_mnist(FASHION_DIR, split)
    idx = np.random.default_rng(seed).permutation(len(images))[offset:offset + n]
    return images[idx], labels[idx]


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def write_shards(out: Path, images: list[bytes], per_shard: int) -> Path:
    """`shard-%06d.tar` (members `<sha256>.png` + `<sha256>.json`) and `shards.json`; returns the index path."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    infos = []
    for s, start in enumerate(range(0, len(images), per_shard)):
        name = f"shard-{s:06d}.tar"
        chunk = images[start:start + per_shard]
        with open(out / name, "wb") as fh:
            w = wds.TarWriter(fh, encoder=False, mtime=0, user="", group="", mode=0o644)  # int: no PAX headers
            for i, data in enumerate(chunk):
                key = hashlib.sha256(data + str(start + i).encode()).hexdigest()
                w.write({"__key__": key, "png": data, "json": json.dumps({"i": start + i}).encode()})
            w.close()
        data = (out / name).read_bytes()
        infos.append({"name": name, "count": len(chunk), "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()})
    index = {"format": "webdataset", "count": len(images), "bytes": sum(i["bytes"] for i in infos), "shards": infos}
    (out / "shards.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out / "shards.json"


def fashion_shards(out: Path, n: int, per_shard: int, seed: int = 0) -> Path:
    images, _ = fashion_items(n, "train", seed=seed)
    return write_shards(out, [png_bytes(a) for a in images], per_shard)
