"""The WebDataset training loader: one global batch however it is split over ranks/workers, disjoint rank slices,
reshuffling every pass, resumption from a step, and reading through an opener (local or s3://)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_core.data.batch_augment import BatchMultiCrop
from dinov2_core.data.loader import (
    SSLDataLoader,
    global_batch_masks,
    mask_batch_fields,
    plan_streams,
    read_shard_index,
)
from dinov2_core.data.masking import MaskingGenerator


class CheapCrops:
    """Stand-in for the multi-crop transform: random (torch RNG) brightness per crop, 28/14 px."""

    def __call__(self, image):
        x = torch.from_numpy(np.asarray(image.resize((28, 28)), dtype=np.float32)).permute(2, 0, 1) / 255
        g = [x * torch.rand(()) for _ in range(2)]
        loc = [x[:, :14, :14] * torch.rand(()) for _ in range(2)]
        return {"global_crops": g, "local_crops": loc}


def make_loader(index, world=1, rank=0, start=0, workers=0, streams=2, batch=8, transform=None, opener=None,
                size=28, augment_device=None):
    kw = {"opener": opener} if opener else {}
    kw.update(augment_device=augment_device)
    return SSLDataLoader(index, transform or CheapCrops(), global_batch_size=batch, streams=streams, patch_size=14,
                         global_crops_size=size, rank=rank, world_size=world, seed=3, start_step=start,
                         num_workers=workers, **kw)


def take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def merge_ranks(parts, n_global=2, n_local=2):
    """Concatenate rank batches (each crop-major over its own images) into the global crop-major layout."""
    def cat(key, n_crops):
        chunks = [p[key].chunk(n_crops) for p in parts]
        return torch.cat([torch.cat([c[i] for c in chunks]) for i in range(n_crops)])

    return {"collated_global_crops": cat("collated_global_crops", n_global),
            "collated_local_crops": cat("collated_local_crops", n_local),
            "collated_masks": cat("collated_masks", n_global), "keys": [k for p in parts for k in p["keys"]]}


def test_plan_streams_deals_every_sample_once():
    plan = plan_streams([60, 60, 50, 70], 2)
    assert [sum(u.count for u in units) for units in plan] == [110, 130]
    fine = plan_streams([60, 61], 4)  # fewer shards than streams: interleaved slices of shards
    assert sum(u.count for units in fine for u in units) == 121 and all(units for units in fine)
    with pytest.raises(ValueError, match="no samples"):
        plan_streams([1], 3)


TRANSFORMS = {"per-image": CheapCrops, "batched": lambda: BatchMultiCrop(local_crops_number=2, global_crops_size=28,
                                                                          local_crops_size=14)}


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_one_and_two_processes_see_the_same_global_batch(fmnist_shards, transform):
    index = read_shard_index(str(fmnist_shards))
    single = take(make_loader(index, transform=TRANSFORMS[transform]()), 3)
    ranks = [take(make_loader(index, world=2, rank=r, transform=TRANSFORMS[transform]()), 3) for r in range(2)]
    for step in range(3):
        merged = merge_ranks([ranks[0][step], ranks[1][step]])
        assert merged["keys"] == single[step]["keys"]
        assert set(ranks[0][step]["keys"]).isdisjoint(ranks[1][step]["keys"])
        for key in ("collated_global_crops", "collated_local_crops", "collated_masks"):
            assert torch.equal(merged[key], single[step][key]), key
        assert ranks[0][step]["collated_global_crops"].shape[0] == 2 * 4  # local batch 4 = 8 / 2


def test_workers_that_cannot_share_the_streams_are_refused(fmnist_shards):
    """A worker deals whole streams; 3 workers on 2 streams used to become gcd = 1 worker without a word."""
    index = read_shard_index(str(fmnist_shards))
    with pytest.raises(ValueError, match="3 loader workers cannot share this process's 2 shard streams"):
        make_loader(index, workers=3, streams=2)
    with pytest.raises(ValueError, match="multiple of 4"):
        make_loader(index, world=2, workers=2, streams=2)  # 1 stream per process
    assert make_loader(index, workers=2, streams=4).num_workers == 2


@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
def test_workers_and_resumption_do_not_change_batches(fmnist_shards, transform):
    index = read_shard_index(str(fmnist_shards))
    make = TRANSFORMS[transform]
    ref = take(make_loader(index, transform=make()), 4)
    with_workers = take(make_loader(index, workers=2, transform=make()), 4)
    resumed = take(make_loader(index, start=2, transform=make()), 2)
    for a, b in zip(ref, with_workers):
        assert a["keys"] == b["keys"] and torch.equal(a["collated_global_crops"], b["collated_global_crops"])
        assert torch.equal(a["collated_masks"], b["collated_masks"])  # each worker drew its own images' masks
    for a, b in zip(ref[2:], resumed):
        assert a["step"] == b["step"] and a["keys"] == b["keys"]
        assert torch.equal(a["collated_local_crops"], b["collated_local_crops"])
        assert torch.equal(a["collated_masks"], b["collated_masks"])


@pytest.mark.parametrize("world,rank,workers", [(1, 0, 0), (1, 0, 2), (2, 1, 2)])
def test_masks_drawn_in_workers_are_the_global_batch_masks_of_the_ranks_rows(fmnist_shards, world, rank, workers):
    """Workers draw the masks of their own images (off the training process); together they must be exactly the
    global batch's masks of this rank's rows, crop-major, whatever the split into ranks and workers."""
    index = read_shard_index(str(fmnist_shards))
    batch, local = 8, 8 // world
    got = take(make_loader(index, world=world, rank=rank, workers=workers, streams=4, start=1, size=56), 2)
    rows = [c * batch + rank * local + i for c in range(2) for i in range(local)]
    for step, b in zip((1, 2), got):
        ref = global_batch_masks(step, 3, batch, rows, 2, MaskingGenerator((4, 4), max_num_patches=8), (0.1, 0.5), 0.5)
        assert b["step"] == step and ref.any() and torch.equal(b["collated_masks"], ref)


@pytest.mark.parametrize("workers", [0, 2])
def test_crops_rendered_on_the_training_device_equal_the_workers_crops(fmnist_shards, workers):
    """On a GPU the workers hand over uint8 images and crop choices and the crops are rendered there: the batches must
    be the ones the workers would have rendered (here the 'device' is the CPU, so exactly equal)."""
    index = read_shard_index(str(fmnist_shards))
    make = TRANSFORMS["batched"]
    ref = take(make_loader(index, workers=workers, transform=make(), streams=4), 3)
    on_device = make_loader(index, workers=workers, transform=make(), streams=4, augment_device="cpu")
    part = next(iter(on_device.dataset))
    assert "global" not in part and part["plan"].canvas.dtype == torch.uint8  # what crosses the process boundary
    for a, b in zip(ref, take(on_device, 3)):
        assert a["keys"] == b["keys"] and a["step"] == b["step"]
        for key in ("collated_global_crops", "collated_local_crops", "collated_masks"):
            assert torch.equal(a[key], b[key]), key
    with pytest.raises(ValueError, match="cannot hand over crop plans"):
        make_loader(index, transform=CheapCrops(), augment_device="cpu")


def test_crops_stay_in_the_workers_without_a_gpu_or_without_its_roi_align(monkeypatch, caplog):
    from dinov2_core.train import engine

    assert engine.crop_device(torch.device("cpu")) is None
    monkeypatch.setattr(engine, "renders_on", lambda device: None)
    assert engine.crop_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    monkeypatch.setattr(engine, "renders_on", lambda device: "NotImplementedError: no CUDA kernel for roi_align")
    with caplog.at_level("WARNING", logger="dinov2.train"):
        assert engine.crop_device(torch.device("cuda", 0)) is None
    assert "rendered by the loader workers" in caplog.text and "roi_align" in caplog.text


def test_pinned_batches_are_assembled_in_page_locked_memory_and_equal_unpinned_ones(fmnist_shards, monkeypatch):
    """On CUDA the loader concatenates the workers' parts straight into page-locked memory (one copy, and the
    trainer's non-blocking transfer is really asynchronous). No CPU-only torch can pin, so the allocation is
    recorded and served unpinned: what is checked here is that it is asked for, and the batches it yields."""
    index = read_shard_index(str(fmnist_shards))
    ref = take(make_loader(index, workers=2), 2)
    pinned_requests, empty = [], torch.empty

    def recording_empty(*shape, pin_memory=False, **kw):
        pinned_requests.append(pin_memory)
        return empty(*shape, **kw)

    loader = make_loader(index, workers=2)
    loader.pin_memory = True
    monkeypatch.setattr(torch, "empty", recording_empty)
    got = take(loader, 2)
    assert pinned_requests.count(True) == 4  # global and local crops of each batch
    for a, b in zip(ref, got):
        assert a["keys"] == b["keys"]
        for key in ("collated_global_crops", "collated_local_crops"):
            assert torch.equal(a[key], b[key])


def test_each_pass_covers_the_data_once_and_reshuffles(fmnist_shards):
    index = read_shard_index(str(fmnist_shards))
    steps = index.total // 8  # 240 images, 2 streams of 120, 4 per stream per step: one pass = 30 steps
    batches = take(make_loader(index), 2 * steps)
    first = [k for b in batches[:steps] for k in b["keys"]]
    second = [k for b in batches[steps:] for k in b["keys"]]
    assert len(set(first)) == index.total and sorted(first) == sorted(second)
    assert first != second  # a new order every pass


def test_masks_follow_the_official_stratification():
    gen = MaskingGenerator((4, 4), max_num_patches=8)
    rows = list(range(16))
    masks = global_batch_masks(0, 0, 8, rows, 2, gen, (0.1, 0.5), 0.5)
    n_masked_crops = int((masks.sum(1) > 0).sum())
    assert masks.shape == (16, 16) and n_masked_crops <= 8 and masks.sum() > 0
    fields = mask_batch_fields(masks)
    assert fields["mask_indices_list"].numel() == int(masks.sum()) == int(fields["n_masked_patches"])
    per_image = torch.zeros(16).index_add_(0, fields["mask_indices_list"] // 16, fields["masks_weight"])
    assert torch.allclose(per_image[masks.sum(1) > 0], torch.ones(n_masked_crops))  # each image weighs 1
    half = global_batch_masks(0, 0, 8, rows[4:8] + rows[12:16], 2, gen, (0.1, 0.5), 0.5)
    assert torch.equal(half, masks[rows[4:8] + rows[12:16]])  # a rank's rows do not depend on the split


def test_real_multicrop_transform_through_s3(fmnist_shards, s3_bucket):
    from tasks.storage import Storage, join_url

    storage = Storage()
    prefix = f"s3://{s3_bucket}/shards"
    for path in Path(fmnist_shards).parent.iterdir():
        storage.put_file(path, join_url(prefix, path.name)) if path.suffix == ".tar" else \
            storage.write_bytes(join_url(prefix, path.name), path.read_bytes())
    aug = BatchMultiCrop(local_crops_number=2, global_crops_size=56, local_crops_size=28)  # the pipeline's
    local = read_shard_index(str(fmnist_shards))
    remote = read_shard_index(f"{prefix}/shards.json", opener=storage.open_read)
    assert remote.counts == local.counts and remote.urls[0].startswith("s3://")
    a = take(make_loader(local, transform=aug, size=56), 1)[0]
    b = take(make_loader(remote, transform=aug, opener=storage.open_read, size=56), 1)[0]
    assert a["collated_global_crops"].shape == (16, 3, 56, 56) and a["collated_local_crops"].shape == (16, 3, 28, 28)
    assert a["keys"] == b["keys"] and torch.equal(a["collated_global_crops"], b["collated_global_crops"])


def test_augmentation_strengths_are_params(fmnist_shards, train_params):
    """crops.blur_probs / solarize_prob reach the stage's batched transform (e.g. no blur for tiny grey images)."""
    from dinov2_core.train.engine import make_loader as stage_loader
    from tasks.pretrain import build_spec

    params = train_params("pretrain", fmnist_shards, 1, extra=["pretrain.crops.blur_probs=[0.0,0.0,0.3]",
                                                             "pretrain.crops.solarize_prob=0.0"])
    aug = stage_loader(build_spec(params), 14, 0, 1, 0, False).dataset.transform
    crops = [aug.sample(s, 28, 28) for s in range(2000)]
    assert not any(c[i].blur_sigma is not None for c in crops for i in (0, 1))
    assert not any(c[1].solarize for c in crops)
    assert abs(np.mean([c[2].blur_sigma is not None for c in crops]) - 0.3) < 0.04


def test_a_damaged_or_rewritten_shard_is_one_line_naming_it(fmnist_shards, tmp_path):
    """A shard truncated after the index was written (a copy cut short) raised tarfile's ReadError, which names no
    shard and is no ValueError (so training ranks printed a traceback); a valid tar with fewer samples than the index
    lists asked "is shards.json stale?". Both now name the shard and the command that writes the shards again."""
    import shutil
    import tarfile

    shards = tmp_path / "shards"
    shutil.copytree(fmnist_shards.parent, shards)  # the fixture is the index file, its shards beside it
    index = read_shard_index(str(shards / fmnist_shards.name))
    victim = Path(index.urls[1])
    data = victim.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        cut = tf.getmembers()[20]
    victim.write_bytes(data[: cut.offset_data + cut.size // 2])  # inside a member's bytes
    with pytest.raises(ValueError, match=r"shard-\S*: not a readable tar shard \(unexpected end of data\).*"
                                         r"dvc repro shards") as err:
        take(make_loader(index, streams=4), 60)
    assert str(victim) in str(err.value) and "\n" not in str(err.value)
    victim.write_bytes(data[: cut.offset])  # cut between members: tarfile sees the end of the archive
    with pytest.raises(ValueError, match=r"read 10 samples in slice 0/1, the shard index lists 60"):
        take(make_loader(index, streams=4), 60)
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(victim, "w") as dst:
        members = src.getmembers()
        for m in members[:-2]:  # one sample (image + its label member) fewer
            dst.addfile(m, src.extractfile(m))
    with pytest.raises(ValueError, match=r"the shard index lists 60: the shard was rewritten .*dvc repro shards"):
        take(make_loader(index, streams=4), 60)
