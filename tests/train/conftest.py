"""Fixtures of the training tests: tiny real shards (Fashion-MNIST) and a tiny, fast training configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train._shards import fashion_shards

ROOT = Path(__file__).resolve().parents[2]

# A 2-block, 48-d ViT-S/14 on 56/28 px crops with small heads: one iteration takes a few tens of ms.
TINY_MODEL = ["model.depth=2", "model.embed_dim=48", "model.num_heads=3"]
TINY_HEADS = ["n_prototypes=64", "hidden_dim=64", "bottleneck_dim=32"]


def tiny_training(stage: str, out: Path, shards: Path, steps: int, batch: int = 8, every: int = 0,
                  extra: list[str] | None = None) -> list[str]:
    ov = [f"{stage}.out={out}", f"{stage}.data.shards={shards}", f"{stage}.data.global_batch_size={batch}",
          f"{stage}.data.streams=2", f"{stage}.data.num_workers=0", f"{stage}.optim.epochs={steps}",
          f"{stage}.optim.epoch_length=1", f"{stage}.optim.warmup_epochs=1", f"{stage}.checkpoint.every={every}",
          f"{stage}.monitor.eval_dir=null", f"{stage}.crops.local_crops_number=2"]
    if stage != "adapt":
        ov += [f"{stage}.optim.warmup_teacher_temp_epochs=1"]
        ov += [f"{stage}.loss.{h}.{kv}" for h in ("dino_head", "ibot_head") for kv in TINY_HEADS]
    return ov + (extra or [])


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> Path:
    """240 real Fashion-MNIST items in 4 shards (the layout of the shards stage)."""
    return fashion_shards(tmp_path_factory.mktemp("shards"), 240, 60)


@pytest.fixture
def train_params(tmp_path):
    """Params for a tiny run of `stage` under tmp_path (reports included)."""
    from tasks.params import load_params

    def make(stage: str, shards: Path, steps: int, out: Path | None = None, **kw):
        out = out or tmp_path / stage
        extra = kw.pop("extra", [])
        ov = TINY_MODEL + [f"reports={tmp_path / 'reports'}", "launch.omp_threads=1"]
        ov += tiny_training(stage, out, shards, steps, extra=extra, **kw)
        return load_params(ROOT / "params.yaml", ov)

    return make
