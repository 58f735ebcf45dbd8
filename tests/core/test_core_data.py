"""Multi-crop augmentation, iBOT block masking and the step collate."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2_core.data import (
    PAPER_BLUR_PROBS,
    DataAugmentationDINO,
    MaskingGenerator,
    MultiCropCollator,
    collate_data_and_cast,
)


def _image(seed=0, size=(120, 90)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_multicrop_defaults_follow_the_paper():
    aug = DataAugmentationDINO()
    assert aug.global_crops_scale == (0.32, 1.0) and aug.local_crops_scale == (0.05, 0.32)
    assert (aug.global_crops_size, aug.local_crops_size, aug.local_crops_number) == (224, 98, 8)
    assert aug.blur_probs == PAPER_BLUR_PROBS == (1.0, 0.1, 0.5)
    out = aug(_image(), seed=0)
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 8
    assert all(t.shape == (3, 224, 224) and t.dtype == torch.float32 for t in out["global_crops"])
    assert all(t.shape == (3, 98, 98) for t in out["local_crops"])
    assert type(out["global_crops"][0]) is torch.Tensor  # plain tensors, not tv_tensors


def test_multicrop_sizes_and_counts_are_arguments_and_tensor_input_works():
    aug = DataAugmentationDINO(local_crops_number=3, global_crops_size=56, local_crops_size=28)
    out = aug(torch.rand(3, 64, 80), seed=1)
    assert [t.shape for t in out["global_crops"]] == [(3, 56, 56)] * 2
    assert [t.shape for t in out["local_crops"]] == [(3, 28, 28)] * 3
    # normalised with ImageNet statistics: values leave [0, 1]
    assert min(float(t.min()) for t in out["global_crops"]) < 0


def test_multicrop_deterministic_given_seed_or_generator_and_rng_untouched():
    aug = DataAugmentationDINO(local_crops_number=2, global_crops_size=56, local_crops_size=28)
    img = _image(3)
    state = torch.random.get_rng_state()
    a = aug(img, generator=torch.Generator().manual_seed(5))
    b = aug(img, generator=torch.Generator().manual_seed(5))
    c = aug(img, generator=torch.Generator().manual_seed(6))
    assert torch.equal(torch.random.get_rng_state(), state)
    for u, v in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert torch.equal(u, v)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def test_blur_probabilities_are_not_inverted():
    from dinov2_core.data.augmentations import gaussian_blur

    img = torch.from_numpy(np.array(_image(1, (40, 40)))).permute(2, 0, 1).contiguous()
    torch.manual_seed(0)
    always = gaussian_blur(1.0)
    never = gaussian_blur(0.0)
    assert all(not torch.equal(always(img), img) for _ in range(5))
    assert all(torch.equal(never(img), img) for _ in range(5))


def test_masking_generator_counts_and_blocks():
    gen = MaskingGenerator(input_size=(16, 16), max_num_patches=0.5 * 256)
    rng = random.Random(0)
    for target in (0, 10, 50, 120):
        m = gen(target, generator=rng)
        assert m.shape == (16, 16) and m.dtype == bool
        assert m.sum() <= target
        if target:
            assert m.sum() >= 0.5 * target  # blocks fill most of the budget
    # block-wise: masked patches have masked neighbours (not i.i.d. salt-and-pepper)
    m = gen(60, generator=rng)
    ys, xs = np.nonzero(m)
    neighbours = [
        any(
            0 <= y + dy < 16 and 0 <= x + dx < 16 and m[y + dy, x + dx]
            for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0))
        )
        for y, x in zip(ys, xs)
    ]
    assert all(neighbours)


def test_masking_generator_deterministic_with_torch_generator():
    gen = MaskingGenerator(16, max_num_patches=128)
    a = gen(70, generator=torch.Generator().manual_seed(3))
    b = gen(70, generator=torch.Generator().manual_seed(3))
    c = gen(70, generator=torch.Generator().manual_seed(4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def _samples(n, n_local=2, g=56, l=28):
    return [
        (
            {
                "global_crops": [torch.full((3, g, g), float(i)), torch.full((3, g, g), 10.0 + i)],
                "local_crops": [torch.full((3, l, l), 20.0 + i + 0.1 * j) for j in range(n_local)],
            },
            (),
        )
        for i in range(n)
    ]


def test_collate_outputs_match_reference_contract():
    n_img, n_tok = 8, 16  # 56 px global crops, patch 14 -> 4x4
    out = collate_data_and_cast(
        _samples(n_img), (0.1, 0.5), 0.5, torch.float32, generator=torch.Generator().manual_seed(0)
    )
    assert set(out) == {
        "collated_global_crops",
        "collated_local_crops",
        "collated_masks",
        "mask_indices_list",
        "masks_weight",
        "n_masked_patches",
        "upperbound",
    }
    gc, lc = out["collated_global_crops"], out["collated_local_crops"]
    assert gc.shape == (2 * n_img, 3, 56, 56) and lc.shape == (2 * n_img, 3, 28, 28)
    # crop-major order: crop 0 of every image, then crop 1
    assert gc[:n_img, 0, 0, 0].tolist() == list(range(n_img))
    assert gc[n_img:, 0, 0, 0].tolist() == [10.0 + i for i in range(n_img)]
    masks = out["collated_masks"]
    assert masks.shape == (2 * n_img, n_tok) and masks.dtype == torch.bool
    masked_images = int((masks.sum(1) > 0).sum())
    assert masked_images <= n_img  # half of the 16 global crops at most (a tiny mask can round to 0 patches)
    assert torch.equal(out["mask_indices_list"], masks.flatten().nonzero().flatten())
    n = int(masks.sum())
    assert out["n_masked_patches"].tolist() == [n] and out["n_masked_patches"].dtype == torch.long
    assert n <= out["upperbound"]
    # weight of a masked patch = 1 / (masked patches of its image): sums to 1 per masked image
    per_image = torch.zeros(2 * n_img).index_add_(0, out["mask_indices_list"] // n_tok, out["masks_weight"])
    torch.testing.assert_close(per_image, (masks.sum(1) > 0).float())


def test_collate_mask_ratios_are_stratified_in_range():
    # 64 global crops, 32 masked, ratio bins over (0.1, 0.5), on a 16x16 grid
    out = collate_data_and_cast(
        _samples(32, n_local=0, g=224),
        (0.1, 0.5),
        0.5,
        torch.float32,
        generator=torch.Generator().manual_seed(1),
    )
    counts = out["collated_masks"].sum(1)
    ratios = (counts[counts > 0].float() / 256).sort().values
    assert 28 <= len(ratios) <= 32
    assert ratios.max() <= 0.5 and ratios.min() >= 0.02
    assert ratios[-1] - ratios[0] > 0.25  # spread over the range, not all the same ratio
    assert out["collated_local_crops"].shape[0] == 0


def test_collator_is_deterministic_given_seed():
    a = MultiCropCollator(seed=7)(_samples(4))
    b = MultiCropCollator(seed=7)(_samples(4))
    c = MultiCropCollator(seed=8)(_samples(4))
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    assert not torch.equal(a["collated_masks"], c["collated_masks"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_collate_casts_crops(dtype):
    out = collate_data_and_cast(_samples(2), dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert out["collated_global_crops"].dtype == dtype and out["collated_local_crops"].dtype == dtype
