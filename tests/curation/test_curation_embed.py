import io

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.copy_detection_corpora import (
    REUPLOAD,
    build_copy_detection_bench,
    evaluate_thresholds,
    near_duplicate,
)
from dinov2_core.curation.embed import (
    CD_DIM,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneEmbedder,
    CopyDetectionEmbedder,
    copy_detection_descriptor,
    copy_detection_views,
    describe_embedder,
)
from tasks.params import default_params

CD_DEDUP_THRESHOLD = default_params().dedup.threshold  # the pipeline's default (params.yaml states it once)


# ---------------------------------------------------------------- copy-detection descriptor, unit level
def _photo(size=(120, 90), seed=0):
    import skimage.data

    arr = skimage.data.astronaut()[100 : 100 + size[1], 150 : 150 + size[0]]
    return Image.fromarray(arr)


def test_descriptor_shape_norm_determinism_and_batch_independence(fashion_train):
    imgs = [Image.fromarray(a) for a in fashion_train[:300]]
    a = copy_detection_descriptor(imgs, batch_size=64)
    b = copy_detection_descriptor(imgs[::-1], batch_size=1000)[::-1]
    assert a.shape == (300, CD_DIM) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, b)
    # numpy arrays are accepted as well as PIL images
    assert np.allclose(copy_detection_descriptor(fashion_train[:5]), a[:5], atol=1e-6)


def test_descriptor_is_exactly_flip_invariant_and_colour_blind():
    img = _photo()
    flipped = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    d = copy_detection_descriptor([img, flipped, img.convert("L"), img.rotate(90, expand=True)])
    assert d[0] @ d[1] > 0.9999
    assert d[0] @ d[2] > 0.9999
    assert d[0] @ d[3] < 0.9  # but not rotation invariant: structure matters


def test_flat_images_are_duplicates_of_each_other_only():
    flat = [Image.new("L", (30, 30), 0), Image.new("RGB", (64, 20), (200, 10, 10)), _photo()]
    d = copy_detection_descriptor(flat)
    assert d[0] @ d[1] == pytest.approx(1.0)
    assert abs(d[0] @ d[2]) < 1e-6


# ---------------------------------------------------------------- calibration on real data
@pytest.fixture(scope="module")
def reupload_bench(fashion_train):
    # full-size calibration bench (5,000 distinct Fashion-MNIST + 780 photo tiles / faces, 600 copies) with
    # the first seed NOT used for calibration (calibration used seeds 0-2)
    bench = build_copy_detection_bench(fashion_train, transforms=REUPLOAD, seed=3)
    return bench, copy_detection_descriptor(bench.images)


def test_recall_of_reuploaded_items_on_held_out_bench(reupload_bench):
    bench, emb = reupload_bench
    table = evaluate_thresholds(emb, bench.source, bench.is_copy, [CD_DEDUP_THRESHOLD])
    # target 0.95; 600 copies give a binomial s.e. of ~0.009, held-out seeds 3-10 measured 0.947-0.963
    assert table.recall[0] >= 0.94
    fm = bench.is_copy & (bench.origin == "fashion_mnist")
    sims = (emb[fm] * emb[bench.source[fm]]).sum(1)
    assert (sims > CD_DEDUP_THRESHOLD).mean() >= 0.94


def test_distinct_fashion_items_are_not_merged(reupload_bench):
    bench, emb = reupload_bench
    table = evaluate_thresholds(emb, bench.source, bench.is_copy, [CD_DEDUP_THRESHOLD, 0.9])
    assert table.pair_precision[0] >= 0.99
    assert table.distinct_merged[0] <= 0.002 * (~bench.is_copy).sum()
    # and the threshold is not loose: 0.9 would merge many look-alike items (it is a real trade-off)
    assert table.pair_precision[1] < 0.5


def test_each_reupload_transform_alone_is_detected(fashion_train):
    rng = np.random.default_rng(5)
    originals = [Image.fromarray(a) for a in fashion_train[1000:1200]]
    src = copy_detection_descriptor(originals)
    for t in ("flip", "resize", "jpeg"):
        copies = [near_duplicate(im, rng, transforms=(t,))[0] for im in originals]
        sims = (copy_detection_descriptor(copies) * src).sum(1)
        assert (sims > CD_DEDUP_THRESHOLD).mean() >= 0.95, t


def test_natural_photo_copies_survive_colour_to_grey_and_jpeg():
    from benchmarks.copy_detection_corpora import natural_tiles

    tiles = natural_tiles()[:60]
    rng = np.random.default_rng(0)
    copies = [
        near_duplicate(
            t, rng, transforms=("grey", "resize", "jpeg"), scale_range=(0.7, 1.5), jpeg_range=(60, 95)
        )[0]
        for t in tiles
    ]
    sims = (copy_detection_descriptor(copies) * copy_detection_descriptor(tiles)).sum(1)
    assert (sims > CD_DEDUP_THRESHOLD).mean() >= 0.9


def test_jpeg_bytes_roundtrip_is_a_duplicate(fashion_train):
    img = Image.fromarray(fashion_train[7]).resize((56, 56))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=40)
    d = copy_detection_descriptor([img, Image.open(io.BytesIO(buf.getvalue()))])
    assert d[0] @ d[1] > CD_DEDUP_THRESHOLD


def test_views_shape_norms_and_degenerate_crops(fashion_train):
    framed = np.zeros((30, 30), np.uint8)
    framed[0, :] = 255  # structure only in the outer ring: every centre crop is flat
    imgs = [Image.fromarray(fashion_train[0]), Image.fromarray(framed), Image.new("L", (2, 2), 9)]
    v = copy_detection_views(imgs)
    assert v.shape == (4, 3, CD_DIM) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v[:, 0], axis=1), 1.0, atol=1e-5)
    assert not v[:, 1:].any()  # flat crop of a textured image / too small to crop: zero, matches nothing
    # a view is the descriptor of the centre crop (1 px per side on 28 px for the first view)
    crop = Image.fromarray(fashion_train[0]).crop((1, 1, 27, 27))
    assert np.allclose(v[0, 0], copy_detection_descriptor([crop])[0], atol=1e-6)


def test_centre_cropped_copies_are_found_only_with_views(fashion_train):
    from dinov2_core.curation.dedup import deduplicate

    rng = np.random.default_rng(3)
    originals = [Image.fromarray(a) for a in fashion_train[2000:2600]]
    copies = [near_duplicate(im, rng, transforms=("centre_crop", "jpeg"))[0] for im in originals[:150]]
    imgs = originals + copies
    emb = copy_detection_descriptor(imgs)
    keys = [f"{i:04d}" for i in range(len(imgs))]
    plain = deduplicate(emb, keys, threshold=CD_DEDUP_THRESHOLD).frame
    viewed, metrics = deduplicate(emb, keys, threshold=CD_DEDUP_THRESHOLD, views=copy_detection_views(imgs))

    def recall(df):
        c = df.component.to_numpy()
        return float(np.mean(c[600:] == c[:150]))

    assert recall(plain) < 0.2
    assert recall(viewed) >= 0.85
    assert metrics["n_view_edges"] > 0
    # no distinct originals merged by the extra edges
    assert viewed.component[:600].nunique() >= 598


# ---------------------------------------------------------------- backbone embedder
class StandInViT(torch.nn.Module):
    """Minimal stand-in with the DINOv2 forward_features contract; records what it was fed."""

    patch_size = 14

    def __init__(self, dim=12):
        super().__init__()
        self.embed_dim = dim
        self.patch = torch.nn.Conv2d(3, dim, 14, stride=14)
        self.seen = []

    def forward_features(self, x):
        assert x.shape[-1] % 14 == 0 and x.shape[-2] % 14 == 0
        self.seen.append((tuple(x.shape), torch.is_grad_enabled(), self.training))
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return {"x_norm_clstoken": tokens.mean(1) * 3.0, "x_norm_patchtokens": tokens}


def _images():
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8))
        for h, w in [(50, 70), (224, 224), (33, 20), (90, 90), (300, 128)]
    ] + [rng.integers(0, 255, size=(40, 40), dtype=np.uint8)]  # grey numpy array


def test_backbone_embedder_shapes_norm_and_resizing():
    torch.manual_seed(0)
    model = StandInViT()
    model.train()
    emb = BackboneEmbedder(model, image_size=100, batch_size=4, progress=False)
    assert emb.image_size == 98  # rounded to a multiple of the patch size
    out = emb.embed(_images())
    assert out.shape == (6, 12) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert [s[0] for s in model.seen] == [(4, 3, 98, 98), (2, 3, 98, 98)]
    assert not any(s[1] for s in model.seen)  # inference mode, no autograd
    assert not any(s[2] for s in model.seen)  # eval mode during embedding ...
    assert model.training  # ... and the caller's mode restored
    assert np.allclose(emb.embed(_images()), out, atol=1e-6)  # deterministic


def test_backbone_preprocess_is_imagenet_normalised():
    emb = BackboneEmbedder(StandInViT(), image_size=28, progress=False)
    mean_colour = tuple(round(m * 255) for m in IMAGENET_MEAN)
    x = emb.preprocess([Image.new("RGB", (40, 30), mean_colour), Image.new("RGB", (30, 40), (255, 255, 255))])
    assert x.shape == (2, 3, 28, 28)
    assert x[0].abs().max() < 0.01
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[1].mean(dim=(1, 2)), expected, atol=1e-4)


def test_backbone_embedder_rejects_modules_without_forward_features():
    with pytest.raises(TypeError):
        BackboneEmbedder(torch.nn.Linear(3, 3))


def test_describe_embedder_records():
    info = describe_embedder(CopyDetectionEmbedder())
    assert info.name == "copy_detection_dct_v1" and info.dim == CD_DIM
    assert "dedup_threshold" not in info.params  # thresholds are the caller's, not the embedder's
    assert describe_embedder(copy_detection_descriptor) == info
    emb = BackboneEmbedder(StandInViT(dim=12), image_size=28, progress=False)
    d = emb.describe().to_dict()
    assert d["dim"] == 12 and d["params"]["n_params"] == sum(p.numel() for p in emb.model.parameters())
    assert d["params"]["image_size"] == 28
    with pytest.raises(TypeError):
        describe_embedder(object())
