import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from dinov2_core.eval.baselines import RawPixelBackbone
from dinov2_core.eval.features import (
    IMAGENET_MEAN,
    EvalTransformConfig,
    ExtractedFeatures,
    extract_features,
    feature_cache_key,
    make_eval_transform,
)
from dinov2_core.eval.knn import knn_classify
from dinov2_core.eval.linear import linear_probe


@pytest.mark.parametrize("crop_size,expected", [(224, 224), (230, 224), (100, 98), (5, 14)])
def test_eval_transform_crop_is_multiple_of_patch(crop_size, expected):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 410, 3), dtype=np.uint8))
    out = make_eval_transform(resize_size=max(crop_size, 256), crop_size=crop_size, patch_size=14)(img)
    assert out.shape == (3, expected, expected) and out.dtype == torch.float32
    assert expected % 14 == 0


def test_eval_transform_normalises_with_imagenet_stats():
    mean_px = (np.asarray(IMAGENET_MEAN) * 255).round().astype(np.uint8)
    img = Image.fromarray(np.tile(mean_px, (64, 80, 1)))
    out = EvalTransformConfig(resize_size=60, crop_size=56).build()(img)
    assert out.shape == (3, 56, 56) and out.abs().max() < 0.02
    # also accepts uint8 CHW tensors
    out_t = EvalTransformConfig(resize_size=60, crop_size=56).build()(
        torch.from_numpy(np.array(img)).permute(2, 0, 1)
    )
    assert torch.allclose(out, out_t, atol=1e-5)


def test_segmentation_transform_keeps_mask_labels():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    mask = np.zeros((90, 120), dtype=np.uint8)
    mask[:, 60:] = 3
    mask[:10] = 255
    x, m = EvalTransformConfig(resize_size=64, crop_size=56).build_segmentation()(img, Image.fromarray(mask))
    assert x.shape == (3, 56, 56) and m.shape == (56, 56) and m.dtype == torch.long
    assert set(m.unique().tolist()) <= {0, 3, 255}  # nearest: no blended labels


def _loader(n=10, h=56, w=42, bs=4):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 3, h, w, generator=g), torch.arange(n) % 3), batch_size=bs)


def test_extract_features_shapes_and_consistency(tiny_vit):
    tiny_vit.train()
    feats = extract_features(tiny_vit, _loader(), n_last_blocks=4, keep_patch_grid=True, progress=False)
    d = tiny_vit.embed_dim
    assert feats.cls.shape == (10, 4, d) and feats.patch_mean.shape == (10, 4, d)
    assert (
        feats.patch_grid.shape == (10, d, 4, 3) and feats.targets.tolist() == (torch.arange(10) % 3).tolist()
    )
    assert tiny_vit.training  # mode restored
    x = next(iter(_loader()))[0]
    with torch.no_grad():
        tiny_vit.eval()
        ff = tiny_vit.forward_features(x)
    assert torch.allclose(feats.knn_features()[:4], ff["x_norm_clstoken"], atol=1e-5)
    tokens = ff["x_norm_patchtokens"]  # row-major grid order
    assert torch.allclose(feats.patch_grid[:4, :, 2, 1], tokens[:, 2 * 3 + 1], atol=1e-5)
    assert torch.allclose(feats.patch_mean[:4, -1], tokens.mean(1), atol=1e-5)
    assert feats.linear_input(4, True).shape == (10, 5 * d)
    assert feats.linear_input(1, False).shape == (10, d)
    assert (
        feats.patch_grid is not None
        and extract_features(tiny_vit, _loader(), progress=False).patch_grid is None
    )


def test_extract_rejects_non_patch_multiple(tiny_vit):
    with pytest.raises(ValueError, match="multiple"):
        extract_features(tiny_vit, _loader(h=50), progress=False)


def test_features_roundtrip_and_subset(tmp_path, tiny_vit):
    feats = extract_features(tiny_vit, _loader(), keep_patch_grid=True, progress=False)
    feats.save(tmp_path / "f.pt")
    back = ExtractedFeatures.load(tmp_path / "f.pt")
    assert torch.equal(back.cls, feats.cls) and torch.equal(back.patch_grid, feats.patch_grid)
    sub = feats.subset([1, 3])
    assert len(sub) == 2 and torch.equal(sub.targets, feats.targets[[1, 3]])


def test_cache_key_changes_with_weights_dataset_and_transform(tiny_vit_cls):
    torch.manual_seed(0)
    a = tiny_vit_cls()
    torch.manual_seed(0)
    b = tiny_vit_cls()
    tf = EvalTransformConfig()
    k = feature_cache_key(a, "ds:v1", tf)
    assert len(k) == 64 and k == feature_cache_key(b, "ds:v1", tf)
    assert k != feature_cache_key(a, "ds:v2", tf)
    assert k != feature_cache_key(a, "ds:v1", EvalTransformConfig(crop_size=112))
    assert k != feature_cache_key(a, "ds:v1", tf, extra={"n_last_blocks": 1})
    with torch.no_grad():
        b.blocks[0][1].weight[0, 0] += 1e-3
    assert k != feature_cache_key(b, "ds:v1", tf)
    assert feature_cache_key("ckpt-abc", "ds:v1", tf.as_dict()) == feature_cache_key("ckpt-abc", "ds:v1", tf)
    assert feature_cache_key(RawPixelBackbone(cls_size=16), "d", tf) != feature_cache_key(
        RawPixelBackbone(), "d", tf
    )


def test_raw_pixel_backbone_api():
    m = RawPixelBackbone(patch_size=14, cls_size=8)
    x = torch.randn(2, 3, 28, 42)
    outs = m.get_intermediate_layers(x, 4, reshape=False, return_class_token=True, norm=True)
    assert len(outs) == 4
    patches, cls = outs[-1]
    assert patches.shape == (2, 6, 3 * 14 * 14) and cls.shape == (2, 3 * 8 * 8)
    assert torch.equal(patches[0, 4], x[0, :, 14:28, 14:28].reshape(-1))  # row 1, col 1 block
    ff = m.forward_features(x)
    assert torch.equal(ff["x_norm_clstoken"], cls) and ff["x_norm_patchtokens"].shape == patches.shape
    full = RawPixelBackbone(cls_size=None).forward_features(x)["x_norm_clstoken"]
    assert torch.equal(full, x.flatten(1))


def test_random_init_backbone_runs_through_classification_protocols(tiny_vit):
    splits = {
        s: extract_features(tiny_vit, _loader(n=n), progress=False)
        for s, n in (("tr", 30), ("va", 9), ("te", 9))
    }
    knn = knn_classify(
        splits["tr"].knn_features(), splits["tr"].targets, splits["te"].knn_features(), splits["te"].targets
    )
    assert sorted(knn) == [10, 20, 30] and "top5" not in knn[10]
    res = linear_probe(splits["tr"], splits["va"], splits["te"], learning_rates=(0.01,), epochs=1)
    assert len(res.grid) == 4 and 0.0 <= res.test_top1 <= 1.0


def test_real_dinov2_backbone_if_available():
    """Integration with the project's DinoVisionTransformer (skipped until dinov2_core.models exists)."""
    models = pytest.importorskip("dinov2_core.models")
    torch.manual_seed(0)
    m = models.DinoVisionTransformer(
        img_size=56, patch_size=14, embed_dim=32, depth=3, num_heads=2, num_register_tokens=2, block_chunks=0
    )
    x = torch.randn(4, 3, 56, 42)
    feats = extract_features(
        m,
        DataLoader(TensorDataset(x, torch.arange(4)), batch_size=2),
        keep_patch_grid=True,
        n_last_blocks=2,
        progress=False,
    )
    assert feats.cls.shape == (4, 2, 32) and feats.patch_grid.shape == (4, 32, 4, 3)
    with torch.no_grad():
        ff = m.forward_features(x)
        grid_official = m.get_intermediate_layers(x, 1, reshape=True, norm=True)[0]
    assert torch.allclose(feats.knn_features(), ff["x_norm_clstoken"], atol=1e-5)
    assert torch.allclose(feats.patch_grid, grid_official, atol=1e-5)
