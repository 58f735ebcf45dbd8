"""The batched multi-crop augmentation: the paper's crop recipe with per-image parameters, one tensor op per batch."""

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from dinov2_core.data.batch_augment import BatchMultiCrop, _gaussian_blur, _resized_crop_box


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


def test_shapes_crop_major_and_normalised():
    aug = BatchMultiCrop(local_crops_number=3, global_crops_size=56, local_crops_size=28)
    out = aug(_images([(28, 28), (90, 120), (40, 33)]), [1, 2, 3])
    assert out["global"].shape == (2, 3, 3, 56, 56) and out["local"].shape == (3, 3, 3, 28, 28)
    assert out["global"].dtype == torch.float32 and float(out["global"].min()) < 0  # ImageNet-normalised
    none = BatchMultiCrop(local_crops_number=0, global_crops_size=28, local_crops_size=14)(_images([(28, 28)]), [0])
    assert none["local"] is None


def test_an_images_crops_depend_on_its_seed_only():
    """Worker count and rank split change which images share a batch (and the padding): never their crops."""
    aug = BatchMultiCrop(local_crops_number=2, global_crops_size=56, local_crops_size=28)
    small, big = _images([(28, 28), (150, 97)], seed=4)
    alone = aug([small], [11])
    together = aug([big, small], [5, 11])
    assert torch.allclose(alone["global"][:, 0], together["global"][:, 1], atol=1e-5)
    assert torch.allclose(alone["local"][:, 0], together["local"][:, 1], atol=1e-5)
    assert not torch.allclose(alone["global"][:, 0], aug([small], [12])["global"][:, 0])


def test_crop_boxes_follow_random_resized_crop():
    rng = np.random.default_rng(0)
    for h, w, scale in ((28, 28, (0.32, 1.0)), (100, 300, (0.05, 0.32))):
        for _ in range(200):
            x0, y0, x1, y1 = _resized_crop_box(rng, h, w, scale)
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            area = (x1 - x0) * (y1 - y0) / (h * w)
            assert scale[0] * 0.8 - 0.02 <= area <= scale[1] * 1.2 + 0.02  # whole-pixel rounding
    # a 1:12.5 strip rarely fits a 3/4..4/3 box: torchvision's fallback is a centre crop of ratio 3/4
    boxes = [_resized_crop_box(rng, 500, 40, (0.32, 1.0)) for _ in range(50)]
    assert all(0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 500 for x0, y0, x1, y1 in boxes)
    assert (0.0, 223.0, 40.0, 276.0) in boxes


def test_paper_probabilities_per_crop():
    """Blur 1.0 / 0.1 / 0.5 (global 1 / global 2 / local), solarisation 0.2 on the second global crop only,
    jitter 0.8, grayscale 0.2 (measured over many seeds)."""
    aug = BatchMultiCrop(local_crops_number=2, global_crops_size=28, local_crops_size=14)
    crops = [aug.sample(s, 28, 28) for s in range(4000)]
    rate = lambda i, f: np.mean([f(c[i]) for c in crops])
    assert rate(0, lambda c: c.blur_sigma is not None) == 1.0
    assert abs(rate(1, lambda c: c.blur_sigma is not None) - 0.1) < 0.02
    assert abs(rate(2, lambda c: c.blur_sigma is not None) - 0.5) < 0.03
    assert rate(0, lambda c: c.solarize) == 0.0 and rate(2, lambda c: c.solarize) == 0.0
    assert abs(rate(1, lambda c: c.solarize) - 0.2) < 0.03
    assert abs(rate(0, lambda c: c.jitter is not None) - 0.8) < 0.03
    assert abs(rate(3, lambda c: c.gray) - 0.2) < 0.03


def test_blur_matches_torchvision_per_sigma():
    x = torch.rand(3, 3, 28, 28)
    sigmas = torch.tensor([0.3, 1.0, 2.0])
    ours = _gaussian_blur(x, sigmas)
    for i, s in enumerate(sigmas.tolist()):
        ref = TF.gaussian_blur(x[i], kernel_size=[9, 9], sigma=[s, s])
        assert torch.allclose(ours[i], ref, atol=1e-5)


@pytest.mark.parametrize("size", [28, 56])
def test_identity_parameters_reproduce_a_plain_resize(size):
    """With every random choice switched off, a full-image box is an (area-averaged) resize of the image."""
    from dinov2_core.data.batch_augment import CropParams, CropPlan

    aug = BatchMultiCrop(local_crops_number=0, global_crops_size=size, local_crops_size=14)
    img = _images([(28, 28)])[0]
    plain = CropParams((0.0, 0.0, 28.0, 28.0), False, None, False, None, False)
    out = aug.render(CropPlan.from_params(aug._pad_stack([img]), [(0, plain), (0, plain)]))["global"][:, 0]
    out = out[0] * torch.tensor(aug.std).view(3, 1, 1) + torch.tensor(aug.mean).view(3, 1, 1)
    ref = TF.resize(img.float()[None] / 255, [size, size], interpolation=TF.InterpolationMode.BILINEAR,
                    antialias=False)[0]
    assert torch.allclose(out, ref, atol=1e-4)


def test_render_runs_wholly_on_the_target_device():
    """On a GPU the crops are rendered in the training process: every tensor the render computes with must live on
    that device (the 'meta' device stands in for CUDA here: mixing in a CPU tensor raises), with flips, jitter,
    grayscale, blur and solarisation all drawn in the batch."""
    aug = BatchMultiCrop(local_crops_number=6, global_crops_size=56, local_crops_size=28)
    plan = aug.plan(_images([(28 + i % 5, 28) for i in range(64)]), list(range(64)))
    assert all(int(flags.sum()) > 0 for flags in (plan.flip, plan.jitter_on, plan.gray, plan.blur_on, plan.solarize))
    out = aug.render(plan, "meta")
    assert out["global"].device.type == "meta" and out["global"].shape == (2, 64, 3, 56, 56)
    assert out["local"].shape == (6, 64, 3, 28, 28)
