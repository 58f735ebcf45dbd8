"""The training data loader: WebDataset shards -> shuffled, decoded, multi-cropped, masked batches, across ranks.

Contract (what makes runs reproducible, resumable and independent of the number of processes):

* **Global batch.** Step ``s`` consumes one global batch of ``global_batch_size`` images. The data are read as
  ``streams`` independent infinite streams; stream ``j`` contributes ``global_batch_size / streams`` consecutive
  images of its own sequence to every global batch, in stream order. So the global batch of step ``s`` depends on
  (shards, seed, streams, global batch size, s) only.
* **Ranks.** Rank ``r`` of ``W`` owns streams ``[r K/W, (r+1) K/W)``: a disjoint, contiguous slice of the global
  batch, and it reads only those streams' shards. 1 process and 2 processes see the same global batch at every step
  (``streams`` must be a multiple of the world size).
* **Streams.** Shards (or, with fewer shards than streams, interleaved slices of shards) are dealt to streams
  round-robin. A stream walks its units in a fresh random order on every pass and each unit's samples in a fresh
  random order (the shards stage already mixed samples across shards), so the data are reshuffled every pass.
* **Augmentation.** The crops of the ``c``-th image of stream ``j`` are a function of a seed derived from
  (seed, j, c) -- passed to a batched transform (``batch_augment.BatchMultiCrop``, the pipeline's), or set as the
  torch seed around a per-image one: crops do not depend on worker count, rank split or timing.
* **Masks.** iBOT masks are drawn for the whole global batch from (seed, step) with the official stratified
  ratios, and each rank keeps its rows, so masking too is independent of the split. Each worker draws the rows of
  its own images (:class:`BatchMasker`): the block-wise generator is a Python loop (~0.1 ms a crop, 0.1 s a step at
  512 images), off the training process's critical path that way.
* **Workers.** Decoding and augmentation run in ``DataLoader`` worker processes; each worker owns whole streams and
  yields its part of every local batch, the main process concatenates the parts in stream order. With an
  ``augment_device`` (the trainer's GPU) the workers decode and draw the crops' random choices only
  (``BatchMultiCrop.plan``) and the crops are rendered on that device (``render``): the same crops; a worker's time
  per 512 images of 56/28 px with 2 + 6 crops halves (``benchmarks/loader.py``), and what crosses between processes
  is the uint8 images, not 48 MB of float crops.
* **Resumption.** The position is the step: a loader built with ``start_step = s`` skips ``s * per_stream`` samples
  of each stream arithmetically (whole passes and units without reading; one unit read to skip inside it).

The library never imports an S3 client: ``opener(url) -> binary stream`` reaches the shards.
"""

from __future__ import annotations

import functools
import io
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .masking import MaskingGenerator
from .shards import Opener, iter_shard_samples

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _default_opener(url: str):
    return open(url, "rb")


def _seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashing: well mixed, platform independent)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------------------- shard index
@dataclass(frozen=True)
class ShardIndex:
    urls: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return int(sum(self.counts))


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if base else name


def read_shard_index(index_url: str, opener: Opener = _default_opener) -> ShardIndex:
    """``shards.json`` (written by the shards stage: {"shards": [{"name", "count", ...}]}) -> shard URLs + counts.
    Shard names are relative to the index's folder/prefix."""
    with opener(index_url) as fh:
        index = json.loads(fh.read())
    base = index_url.rsplit("/", 1)[0] if "/" in index_url else ""
    shards = index.get("shards", [])
    if not shards:
        raise ValueError(f"{index_url}: the shard index lists no shards")
    return ShardIndex(tuple(_join(base, s["name"]) for s in shards), tuple(int(s["count"]) for s in shards))


# ---------------------------------------------------------------------------------------------- streams
@dataclass(frozen=True)
class _Unit:
    shard: int
    slice: int  # samples whose position in the shard is == slice (mod n_slices)
    n_slices: int
    count: int


def plan_streams(counts: Sequence[int], streams: int) -> list[list[_Unit]]:
    """Deal shards (or interleaved slices of shards, when there are fewer shards than streams) to streams."""
    n_shards = len(counts)
    m = max(1, math.ceil(streams / n_shards))
    plan: list[list[_Unit]] = [[] for _ in range(streams)]
    u = 0
    for i, c in enumerate(counts):
        for t in range(m):
            n = c // m + (1 if t < c % m else 0)
            plan[u % streams].append(_Unit(i, t, m, n))
            u += 1
    for j, units in enumerate(plan):
        if sum(x.count for x in units) == 0:
            raise ValueError(f"loader stream {j} has no samples: {sum(counts)} images in {n_shards} shard(s) cannot "
                             f"feed {streams} streams; lower the number of streams")
    return plan


class _Stream:
    """One infinite, reshuffled-every-pass sequence of (key, image bytes, augmentation seed)."""

    def __init__(self, j: int, units: list[_Unit], urls: Sequence[str], opener: Opener, seed: int) -> None:
        self.j, self.units, self.urls, self.opener, self.seed = j, units, urls, opener, seed
        self.pass_len = sum(u.count for u in units)

    def _read_unit(self, unit: _Unit) -> list[tuple[str, bytes]]:
        out = []
        for pos, sample in enumerate(iter_shard_samples([self.urls[unit.shard]], opener=self.opener)):
            if pos % unit.n_slices != unit.slice:
                continue
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None:
                raise ValueError(f"{self.urls[unit.shard]}: sample {sample.get('__key__')} has no image member")
            out.append((sample["__key__"], sample[ext]))
        if len(out) != unit.count:
            raise ValueError(f"{self.urls[unit.shard]}: read {len(out)} samples in slice {unit.slice}/{unit.n_slices}, "
                             f"the shard index lists {unit.count}: the shard was rewritten or damaged after the index "
                             "(its sha256 is in shards.json); write the shards again (`dvc repro shards`)")
        return out

    def iterate(self, start: int) -> Iterator[tuple[str, bytes, int]]:
        """From the stream's ``start``-th sample on (skipping without decoding)."""
        p, rem = divmod(start, self.pass_len)
        c = start
        while True:
            order = np.random.default_rng(_seed(self.seed, 1, self.j, p)).permutation(len(self.units))
            for k in order:
                unit = self.units[int(k)]
                if rem >= unit.count:
                    rem -= unit.count
                    continue
                items = self._read_unit(unit)
                perm = np.random.default_rng(_seed(self.seed, 2, self.j, p, unit.shard, unit.slice)).permutation(len(items))
                for idx in perm[rem:]:
                    key, data = items[int(idx)]
                    yield key, data, _seed(self.seed, 3, self.j, c)
                    c += 1
                rem = 0
            p += 1


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def decode_tensor(data: bytes, max_side: int | None = None) -> torch.Tensor:
    """Image bytes -> uint8 (3, H, W); with ``max_side``, downscaled so the shorter side is at most that (a batch
    transform pads every image to the largest in the batch, so a huge crawl image must not set the size)."""
    with Image.open(io.BytesIO(data)) as img:
        if max_side and img.format == "JPEG":
            img.draft("RGB", (max_side, max_side))  # DCT-domain downscaling: decode less
        rgb = img.convert("RGB")
    if max_side and min(rgb.size) > max_side:
        f = max_side / min(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * f)), max(1, round(rgb.height * f))), Image.Resampling.BILINEAR,
                         reducing_gap=2.0)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


@dataclass(frozen=True)
class BatchMasker:
    """The iBOT masks of some rows of a step's global batch (:func:`global_batch_masks` with the run's settings);
    picklable, so loader workers draw the masks of their own images."""

    seed: int
    global_batch_size: int
    n_global: int
    mask_generator: MaskingGenerator
    mask_ratio_tuple: tuple[float, float]
    mask_probability: float

    def __call__(self, step: int, rows: Sequence[int]) -> torch.Tensor:
        return global_batch_masks(step, self.seed, self.global_batch_size, rows, self.n_global, self.mask_generator,
                                  self.mask_ratio_tuple, self.mask_probability)


class MultiCropShardDataset(IterableDataset):
    """Yields, per step, this worker's part of the rank's local batch: crops stacked crop-major per crop kind.

    Item: {"global": (n_global, b, 3, G, G), "local": (n_local, b, 3, L, L) or None, "keys": [b keys], and with a
    ``masker`` "masks": (n_global, b, n_tokens) bool, the iBOT masks of these images' global crops}.
    """

    def __init__(self, index: ShardIndex, transform: Callable[[Image.Image], dict[str, Any]], *,
                 global_batch_size: int, streams: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 start_step: int = 0, opener: Opener = _default_opener, num_workers: int = 0,
                 masker: BatchMasker | None = None, plan_only: bool = False) -> None:
        if global_batch_size % streams:
            raise ValueError(f"global batch size {global_batch_size} is not a multiple of the loader's {streams} streams")
        if streams % world_size:
            raise ValueError(f"the loader's {streams} streams cannot be split over {world_size} processes; "
                             "use a multiple of the world size")
        self.index, self.transform, self.opener = index, transform, opener
        self.global_batch_size, self.streams, self.rank, self.world_size = global_batch_size, streams, rank, world_size
        self.seed, self.start_step = seed, start_step
        self.per_stream = global_batch_size // streams
        self.rank_streams = list(range(rank * streams // world_size, (rank + 1) * streams // world_size))
        if num_workers and len(self.rank_streams) % num_workers:  # a worker deals whole streams
            raise ValueError(f"{num_workers} loader workers cannot share this process's {len(self.rank_streams)} "
                             f"shard streams evenly; use a number of streams that is a multiple of "
                             f"{world_size * num_workers}, or fewer workers")
        self.num_workers = num_workers
        self.masker = masker
        if plan_only and not hasattr(transform, "plan"):
            raise ValueError(f"{type(transform).__name__} cannot hand over crop plans (a BatchMultiCrop can)")
        self.plan_only = plan_only  # yield {"plan": CropPlan} for rendering elsewhere instead of the crops
        self.plan = plan_streams(index.counts, streams)

    def worker_streams(self, worker_id: int, n_workers: int) -> list[int]:
        per = len(self.rank_streams) // max(n_workers, 1)
        return self.rank_streams[worker_id * per:(worker_id + 1) * per]

    def _crops(self, data: bytes, seed: int) -> dict[str, Any]:
        image = decode_image(data)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = self.worker_streams(wid, nw)
        start = self.start_step * self.per_stream
        iters = [_Stream(j, self.plan[j], self.index.urls, self.opener, self.seed).iterate(start) for j in mine]
        # this part's images are local-batch positions [first, first + len(mine) * per_stream) (streams in order)
        first = self.rank_streams.index(mine[0]) * self.per_stream if mine else 0
        local_batch = self.global_batch_size // self.world_size
        step = self.start_step
        while True:
            keys, datas, seeds = [], [], []
            for it in iters:
                for _ in range(self.per_stream):
                    key, data, seed = next(it)
                    keys.append(key)
                    datas.append(data)
                    seeds.append(seed)
            if getattr(self.transform, "batched", False):  # one tensor op per batch (batch_augment.BatchMultiCrop)
                max_side = getattr(self.transform, "max_side", None)
                images = [decode_tensor(d, max_side) for d in datas]
                if self.plan_only:
                    part = {"plan": self.transform.plan(images, seeds), "keys": keys}
                else:
                    out = self.transform(images, seeds)
                    part = {"global": out["global"], "local": out["local"], "keys": keys}
            else:
                crops = [self._crops(d, s) for d, s in zip(datas, seeds)]
                g = torch.stack([torch.stack([c["global_crops"][i] for c in crops])
                                 for i in range(len(crops[0]["global_crops"]))])
                n_local = len(crops[0]["local_crops"])
                loc = (torch.stack([torch.stack([c["local_crops"][i] for c in crops]) for i in range(n_local)])
                       if n_local else None)
                part = {"global": g, "local": loc, "keys": keys}
            if self.masker is not None:
                n_global, b = self.masker.n_global, len(keys)
                rows = [c * self.global_batch_size + self.rank * local_batch + first + i
                        for c in range(n_global) for i in range(b)]
                part["masks"] = self.masker(step, rows).unflatten(0, (n_global, b))
            yield part
            step += 1


# ---------------------------------------------------------------------------------------------- masks
def global_batch_masks(step: int, seed: int, global_batch_size: int, rows: Sequence[int], n_global: int,
                       mask_generator: MaskingGenerator, mask_ratio_tuple: tuple[float, float],
                       mask_probability: float) -> torch.Tensor:
    """iBOT masks of the given rows of the *global* batch's global crops (crop-major row = crop * B + image).

    As in the official collate: ``int(n_crops * p)`` crops are masked, with ratios stratified over
    ``mask_ratio_tuple`` (the i-th masked crop draws uniformly in the i-th of equal sub-intervals) and shuffled over
    crops; here over the whole global batch, so the result does not depend on how it is split over ranks.
    """
    n_rows = n_global * global_batch_size
    rng = np.random.default_rng(_seed(seed, 4, step))
    n_masked = int(n_rows * mask_probability)
    lo, hi = mask_ratio_tuple
    bounds = np.linspace(lo, hi, n_masked + 1)
    ratios = np.zeros(n_rows)
    ratios[:n_masked] = rng.uniform(bounds[:-1], bounds[1:]) if n_masked else []
    row_ratio = np.empty(n_rows)
    row_ratio[rng.permutation(n_rows)] = ratios
    n_tokens = mask_generator.num_patches
    out = []
    for row in rows:
        n = int(n_tokens * row_ratio[row])
        gen = torch.Generator().manual_seed(_seed(seed, 5, step, row))
        out.append(torch.from_numpy(mask_generator(n, generator=gen)).flatten())
    return torch.stack(out) if out else torch.zeros(0, n_tokens, dtype=torch.bool)


def mask_batch_fields(masks: torch.Tensor) -> dict[str, Any]:
    """The collate fields the losses consume, from (n_crops * b, N) boolean masks."""
    masks = masks.bool()
    idx = masks.flatten().nonzero().flatten()
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return {"collated_masks": masks, "mask_indices_list": idx, "masks_weight": weight,
            "n_masked_patches": torch.full((1,), idx.shape[0], dtype=torch.long), "upperbound": int(idx.shape[0])}


# ---------------------------------------------------------------------------------------------- the loader
class SSLDataLoader:
    """Iterates local batches of a rank from ``start_step`` on, forever. Batch keys are the official collate's
    (``collated_global_crops`` ... ``masks_weight``) plus ``step`` and ``keys`` (sample keys, crop-0 order)."""

    def __init__(self, index: ShardIndex, transform: Callable, *, global_batch_size: int, streams: int,
                 patch_size: int, global_crops_size: int, n_global_crops: int = 2, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start_step: int = 0, num_workers: int = 0, opener: Opener = _default_opener,
                 mask_ratio_tuple: tuple[float, float] = (0.1, 0.5), mask_probability: float = 0.5,
                 prefetch_factor: int = 2, pin_memory: bool = False,
                 augment_device: torch.device | str | None = None) -> None:
        grid = global_crops_size // patch_size
        self.masker = BatchMasker(seed, global_batch_size, n_global_crops,
                                  MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid),
                                  tuple(mask_ratio_tuple), mask_probability)
        self.dataset = MultiCropShardDataset(
            index, transform, global_batch_size=global_batch_size, streams=streams, rank=rank, world_size=world_size,
            seed=seed, start_step=start_step, opener=opener, num_workers=num_workers, masker=self.masker,
            plan_only=augment_device is not None)
        self.augment_device = torch.device(augment_device) if augment_device is not None else None
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.local_batch_size = global_batch_size // world_size
        self.seed, self.start_step, self.n_global = seed, start_step, n_global_crops
        self.num_workers = self.dataset.num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory

    def _dataloader(self) -> DataLoader:
        # no pinning of the workers' parts: they are concatenated here anyway (see _cat), pinning them would copy twice
        kwargs: dict[str, Any] = {"batch_size": None, "num_workers": self.num_workers}
        if self.num_workers:
            kwargs.update(prefetch_factor=self.prefetch_factor, worker_init_fn=_init_worker, persistent_workers=False)
        return DataLoader(self.dataset, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        parts_per_step = max(self.num_workers, 1)
        with torch.random.fork_rng(devices=[]):  # DataLoader draws worker seeds from the global RNG: keep it intact
            it = iter(self._dataloader())
        step = self.start_step
        while True:
            parts = [next(it) for _ in range(parts_per_step)]
            if self.augment_device is not None:  # each worker's part rendered where the model trains
                parts = [{**self.dataset.transform.render(p["plan"], self.augment_device), "keys": p["keys"],
                          "masks": p["masks"]} for p in parts]
                cat = functools.partial(torch.cat, dim=1)
            else:
                cat = self._cat
            g = cat([p["global"] for p in parts])
            batch: dict[str, Any] = {"collated_global_crops": g.flatten(0, 1)}
            if parts[0]["local"] is not None:
                batch["collated_local_crops"] = cat([p["local"] for p in parts]).flatten(0, 1)
            else:
                batch["collated_local_crops"] = g.new_zeros((0, *g.shape[2:]))
            batch.update(mask_batch_fields(torch.cat([p["masks"] for p in parts], dim=1).flatten(0, 1)))
            batch["keys"] = [k for p in parts for k in p["keys"]]
            batch["step"] = step
            yield batch
            step += 1

    def _cat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The workers' (crops, images, C, H, W) parts side by side along images; with ``pin_memory`` straight into
        page-locked memory (cached by torch's host allocator), so the trainer's non-blocking copy to the GPU is one
        asynchronous transfer rather than a staged one."""
        if not self.pin_memory:
            return torch.cat(parts, dim=1)
        shape = (parts[0].shape[0], sum(p.shape[1] for p in parts), *parts[0].shape[2:])
        return torch.cat(parts, dim=1, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=True))


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)  # workers share the cores with the training process


__all__ = [
    "BatchMasker",
    "MultiCropShardDataset",
    "SSLDataLoader",
    "ShardIndex",
    "decode_image",
    "decode_tensor",
    "global_batch_masks",
    "mask_batch_fields",
    "plan_streams",
    "read_shard_index",
]
