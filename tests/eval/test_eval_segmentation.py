import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from dinov2_core.eval.baselines import RawPixelBackbone
from dinov2_core.eval.features import ExtractedFeatures, extract_features
from dinov2_core.eval.segmentation import (
    LinearSegHead,
    evaluate_segmentation,
    linear_segmentation,
    predict_segmentation,
    save_segmentation_figure,
)

C = 4


def _patch_labels(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, C, (n, h, w), generator=torch.Generator().manual_seed(seed))


def _one_hot_split(n: int, seed: int, scale: int = 4) -> ExtractedFeatures:
    """Features = one-hot of each patch's class; masks = those classes upsampled x scale, some pixels ignored."""
    lab = _patch_labels(n, 4, 4, seed)
    if scale > 1:  # horizontal stripes: bilinear upsampling of logits is exact at two-class boundaries
        lab = lab[:, :, :1].expand(n, 4, 4)
    grid = F.one_hot(lab, C).permute(0, 3, 1, 2).float()
    masks = lab.repeat_interleave(scale, 1).repeat_interleave(scale, 2).clone()
    masks[:, 0, :] = 255  # an ignored stripe: must not count, must not break the loss
    return ExtractedFeatures(
        cls=torch.zeros(n, 1, 1), patch_mean=torch.zeros(n, 1, 1), patch_grid=grid, targets=masks
    )


def test_head_is_bn_plus_1x1_linear_and_upsamples():
    head = LinearSegHead(8, 3)
    assert isinstance(head.bn, torch.nn.BatchNorm2d) and head.conv.kernel_size == (1, 1)
    assert head.conv.bias.abs().sum() == 0 and abs(head.conv.weight.std().item() - 0.01) < 0.01
    assert head(torch.randn(2, 8, 5, 5), (70, 70)).shape == (2, 3, 70, 70)


def test_one_hot_features_reach_perfect_miou():
    train, test = _one_hot_split(24, 0), _one_hot_split(8, 1)
    res = linear_segmentation(train, test, C, lr=0.05, epochs=15, batch_size=8)
    assert res.miou > 0.99 and res.pixel_acc > 0.99
    assert res.confusion.sum() == 8 * 15 * 16  # the ignored stripe (1 of 16 rows) is excluded
    assert res.head is not None and set(res.to_dict()) == {"miou", "pixel_acc", "per_class_iou"}


def test_one_hot_features_same_resolution_as_masks():
    # Arbitrary per-pixel labels (no upsampling involved): the head must be exact.
    train, test = _one_hot_split(16, 2, scale=1), _one_hot_split(8, 3, scale=1)
    res = linear_segmentation(train, test, C, lr=0.05, epochs=15, batch_size=8)
    assert res.miou > 0.999


def test_ignored_pixels_do_not_train_the_head():
    # Most class-1 pixels of the train set are marked 255; were they trained on as any class,
    # class-1 features would be pulled away from class 1 and test mIoU would collapse.
    train, test = _one_hot_split(16, 4, scale=1), _one_hot_split(8, 5, scale=1)
    lab = train.patch_grid.argmax(1)
    train.targets[:12][lab[:12] == 1] = 255
    res = linear_segmentation(train, test, C, lr=0.05, epochs=15, batch_size=8)
    assert res.miou > 0.999


def test_untrained_head_is_far_from_perfect():
    # Guards the test above against a metric that is trivially 1.0.
    test = _one_hot_split(8, 1)
    torch.manual_seed(0)
    head = LinearSegHead(C, C)
    head.conv.weight.data = -torch.eye(C)[:, :, None, None]  # predicts anything but the true class
    res = evaluate_segmentation(head, test.patch_grid, test.targets, C)
    assert res.miou < 0.2


def test_raw_pixel_backbone_end_to_end(tmp_path):
    # Each 14x14 block is a solid colour that identifies its class: raw pixels solve it.
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])

    def make(n, seed):
        lab = _patch_labels(n, 3, 1, seed).expand(n, 3, 4)  # one class per patch row
        img = colours[lab].permute(0, 3, 1, 2).repeat_interleave(14, 2).repeat_interleave(14, 3)
        img = img + 0.05 * torch.randn(img.shape, generator=torch.Generator().manual_seed(seed))
        return img, lab.repeat_interleave(14, 1).repeat_interleave(14, 2)

    model = RawPixelBackbone(patch_size=14)
    feats = {}
    for split, (n, seed) in {"train": (16, 0), "test": (6, 1)}.items():
        img, masks = make(n, seed)
        loader = DataLoader(TensorDataset(img, masks), batch_size=4)
        feats[split] = extract_features(model, loader, n_last_blocks=1, keep_patch_grid=True, progress=False)
    assert feats["train"].patch_grid.shape == (16, 3 * 14 * 14, 3, 4)
    res = linear_segmentation(feats["train"], feats["test"], C, lr=0.05, epochs=10, batch_size=4)
    # Not exactly 1: where two learned logit maps of unequal margins are bilinearly blended, the
    # class boundary shifts by a few pixels — inherent to upsampling patch-level logits.
    assert res.pixel_acc > 0.98 and res.miou > 0.9

    img, masks = make(3, 1)
    pred = predict_segmentation(res.head, feats["test"].patch_grid[:3], tuple(masks.shape[-2:]))
    assert pred.shape == masks.shape and pred.dtype == torch.long
    out = save_segmentation_figure(tmp_path / "seg.png", img, masks, pred, C, max_images=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
