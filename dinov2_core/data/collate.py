"""Batch collation for a DINOv2 step: stack the crops crop-major and draw the iBOT masks.

Output keys (same as the reference collate, which the losses consume):
  collated_global_crops  (n_global * B, 3, G, G)  crop 0 of every image, then crop 1
  collated_local_crops   (n_local * B, 3, L, L)
  collated_masks         (n_global * B, N) bool, N = patches of a global crop
  mask_indices_list      (M,) flat indices of the masked patches in collated_masks
  masks_weight           (M,) 1 / (masked patches of the patch's image): per-image averaging in the iBOT loss
  n_masked_patches       (1,) long, M
  upperbound             int >= M, a shape bound that depends only on B (static buffers / compile-friendly)

Masking (DINOv2 App. B, iBOT settings): a fraction ``mask_probability`` (0.5) of the global crops is masked; their
mask ratios are stratified over ``mask_ratio_tuple`` (0.1, 0.5): the i-th masked crop draws its ratio uniformly in
the i-th of equal sub-intervals, then masks are shuffled across crops.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

from .masking import MaskingGenerator, RngLike


def _sample_dict(s: Any) -> dict[str, Any]:
    # datasets return (augmented_dict, target) like the reference loaders, or the dict alone
    return s[0] if isinstance(s, (tuple, list)) else s


def _shuffled(items: list, rng: RngLike) -> list:
    if isinstance(rng, torch.Generator):
        return [items[i] for i in torch.randperm(len(items), generator=rng).tolist()]
    items = list(items)
    (rng or random).shuffle(items)
    return items


def collate_data_and_cast(
    samples_list: Sequence[Any],
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    generator: RngLike = None,
    patch_size: int = 14,
) -> dict[str, Any]:
    """Collate outputs of :class:`DataAugmentationDINO`. ``mask_generator`` / ``n_tokens`` default to a
    :class:`MaskingGenerator` over the global crop's patch grid (``patch_size``) with blocks of up to half the grid
    (the reference training setup). ``generator`` (torch.Generator or random.Random) makes the masks deterministic;
    without it python's global ``random`` is used, as in the reference."""
    dicts = [_sample_dict(s) for s in samples_list]
    n_global = len(dicts[0]["global_crops"])
    n_local = len(dicts[0]["local_crops"])
    collated_global = torch.stack([d["global_crops"][i] for i in range(n_global) for d in dicts])
    if n_local:
        collated_local = torch.stack([d["local_crops"][i] for i in range(n_local) for d in dicts])
    else:
        collated_local = collated_global.new_zeros((0, *collated_global.shape[1:]))

    if mask_generator is None:
        gh, gw = collated_global.shape[-2] // patch_size, collated_global.shape[-1] // patch_size
        mask_generator = MaskingGenerator(input_size=(gh, gw), max_num_patches=0.5 * gh * gw)
    if n_tokens is None:
        n_tokens = mask_generator.num_patches

    b = len(collated_global)
    n_masked_samples = int(b * mask_probability)
    lo, hi = mask_ratio_tuple
    bounds = torch.linspace(lo, hi, n_masked_samples + 1).tolist()
    rng_uniform = (
        (lambda a, c: a + (c - a) * float(torch.rand((), generator=generator, dtype=torch.float64)))
        if isinstance(generator, torch.Generator)
        else (generator or random).uniform
    )
    upperbound = 0
    masks = []
    for i in range(n_masked_samples):
        ratio = rng_uniform(bounds[i], bounds[i + 1])
        masks.append(torch.from_numpy(mask_generator(int(n_tokens * ratio), generator=generator)))
        upperbound += int(n_tokens * bounds[i + 1])
    for _ in range(n_masked_samples, b):
        masks.append(torch.from_numpy(mask_generator(0, generator=generator)))
    masks = _shuffled(masks, generator)

    collated_masks = torch.stack(masks).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (
        (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    )
    return {
        "collated_global_crops": collated_global.to(dtype),
        "collated_local_crops": collated_local.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }


class MultiCropCollator:
    """Picklable collate_fn for ``DataLoader``. With ``seed`` set, batch k's masks are a function of (seed, k)
    (each worker process keeps its own counter, so combine with a per-worker seed if workers > 0)."""

    def __init__(
        self,
        mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        dtype: torch.dtype = torch.float32,
        n_tokens: int | None = None,
        mask_generator: MaskingGenerator | None = None,
        patch_size: int = 14,
        seed: int | None = None,
    ) -> None:
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = mask_probability
        self.dtype = dtype
        self.n_tokens = n_tokens
        self.mask_generator = mask_generator
        self.patch_size = patch_size
        self.seed = seed
        self._calls = 0

    def __call__(self, samples_list: Sequence[Any]) -> dict[str, Any]:
        gen = None
        if self.seed is not None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._calls)
        self._calls += 1
        return collate_data_and_cast(
            samples_list,
            self.mask_ratio_tuple,
            self.mask_probability,
            self.dtype,
            n_tokens=self.n_tokens,
            mask_generator=self.mask_generator,
            generator=gen,
            patch_size=self.patch_size,
        )


__all__ = ["MultiCropCollator", "collate_data_and_cast"]
