import numpy as np

from dinov2_core.curation.decontaminate import decontaminate
from dinov2_core.curation.dedup import deduplicate
from tasks.params import default_params

from ._util import unit

DEDUP_T, DECONTAM_T = default_params().dedup.threshold, default_params().decontaminate.threshold  # the defaults


def _setup():
    rng = np.random.default_rng(0)
    d = 48
    eval_emb = unit(rng.normal(size=(3, d)))
    pool = unit(rng.normal(size=(40, d)))
    # pool 0 is a near copy of eval 1 (cos ~0.97); pool 1 is a near copy of pool 0 but only ~0.8 from eval 1
    pool[0] = unit(eval_emb[1] + 0.25 * rng.normal(size=d) / np.sqrt(d))
    direction = unit(rng.normal(size=d) - (rng.normal(size=d) @ pool[0]) * pool[0])
    pool[1] = unit(pool[0] + 0.6 * direction)
    pool[2] = unit(pool[1] + 0.05 * rng.normal(size=d) / np.sqrt(d))
    keys = [f"p{i:02d}" for i in range(40)]
    return pool, keys, eval_emb


def test_whole_component_of_a_match_is_removed():
    pool, keys, eval_emb = _setup()
    assert pool[0] @ eval_emb[1] > 0.9 and pool[2] @ eval_emb[1] < 0.9
    dedup = deduplicate(pool, keys, threshold=0.8).frame
    comp = dedup.component.to_numpy()
    assert comp[0] == comp[1] == comp[2]
    df, m = decontaminate(pool, keys, eval_emb, ["e0", "e1", "e2"], components=comp, threshold=0.9)
    assert df.removed.tolist()[:3] == [True, True, True] and not df.removed[3:].any()
    assert df.reason.tolist()[:4] == ["direct", "component", "component", None]
    assert df.matched_eval_id[:3].tolist() == ["e1"] * 3
    assert df.similarity[1] == df.similarity[0]  # inherits the component's best match
    assert df.matched_eval_id[3] is None and np.isnan(df.similarity[3])
    assert (m["n_direct"], m["n_removed"], m["n_eval_matched"]) == (1, 3, 1)


def test_without_components_only_direct_matches_go():
    pool, keys, eval_emb = _setup()
    df = decontaminate(pool, keys, eval_emb, threshold=0.9).frame
    assert df.removed.sum() == 1 and df.removed[0]
    assert df.matched_eval_id[0] == 1  # eval ids default to positions


def test_best_eval_match_is_recorded():
    pool, keys, eval_emb = _setup()
    eval2 = np.vstack([eval_emb, unit(pool[0] + 0.01 * eval_emb[1])])  # e3 even closer to pool 0
    df = decontaminate(pool, keys, eval2, ["e0", "e1", "e2", "e3"], threshold=0.9).frame
    assert df.matched_eval_id[0] == "e3"
    assert df.similarity[0] > 0.99


def test_real_descriptor_removes_reuploaded_test_images_from_a_fashion_pool(fashion_train):
    from PIL import Image

    from benchmarks.copy_detection_corpora import REUPLOAD, load_fashion_mnist, near_duplicate
    from dinov2_core.curation.embed import copy_detection_descriptor

    test_images, _ = load_fashion_mnist(split="test")
    rng = np.random.default_rng(0)
    leaked = [near_duplicate(Image.fromarray(a), rng, transforms=REUPLOAD)[0] for a in test_images[:200]]
    pool_imgs = [Image.fromarray(a) for a in fashion_train[:3000]] + leaked
    pool = copy_detection_descriptor(pool_imgs)
    eval_emb = copy_detection_descriptor(test_images[:1000])
    keys = [f"p{i}" for i in range(len(pool))]
    comps = deduplicate(pool, keys, threshold=DEDUP_T).frame.component.to_numpy()
    df = decontaminate(pool, keys, eval_emb, components=comps, threshold=DECONTAM_T).frame
    assert df.removed[3000:].mean() >= 0.95  # leaked test images go (all transforms compounded)
    # clean training images stay (1.8 % flagged: look-alike twins; the rate grows with the eval set size)
    assert df.removed[:3000].mean() <= 0.03
    hits = df[3000:][df.removed[3000:]]
    assert (hits.matched_eval_id == hits.index - 3000).mean() >= 0.95  # and the right eval image is named


def test_eval_views_catch_crops_of_eval_images(fashion_train):
    from PIL import Image

    from benchmarks.copy_detection_corpora import load_fashion_mnist, near_duplicate
    from dinov2_core.curation.embed import copy_detection_descriptor, copy_detection_views

    test_images, _ = load_fashion_mnist(split="test")
    rng = np.random.default_rng(1)
    evals = [Image.fromarray(a) for a in test_images[:300]]
    cropped = [near_duplicate(im, rng, transforms=("centre_crop",))[0] for im in evals[:100]]
    pool_imgs = [Image.fromarray(a) for a in fashion_train[:1500]] + cropped
    pool = copy_detection_descriptor(pool_imgs)
    keys = [f"p{i}" for i in range(len(pool))]
    ev = copy_detection_descriptor(evals)
    plain = decontaminate(pool, keys, ev, threshold=DECONTAM_T).frame
    viewed, metrics = decontaminate(
        pool, keys, ev, threshold=DECONTAM_T, eval_views=copy_detection_views(evals)
    )
    assert plain.removed[1500:].mean() < 0.3
    assert viewed.removed[1500:].mean() >= 0.9
    assert viewed.removed[:1500].mean() <= 0.02
    assert metrics["n_eval_views"] == 4


def test_verified_copies_below_the_threshold_are_removed_with_their_component():
    pool, keys, eval_emb = _setup()
    n = len(pool)
    rng = np.random.default_rng(7)
    pool[5] = unit(eval_emb[2] + 0.9 * unit(rng.normal(size=pool.shape[1])))  # cos ~0.75: below the threshold
    assert 0.5 < pool[5] @ eval_emb[2] < 0.9
    comp = np.arange(n)
    comp[5] = comp[6] = 5  # pool 5 and 6 are one dedup component
    seen = []

    def verifier(p_idx, e_idx):  # indices: pool 0..n-1, eval n..n+m-1; pool 5 is a copy of eval 2
        seen.extend(zip(p_idx.tolist(), e_idx.tolist()))
        return np.where((p_idx == 5) & (e_idx == n + 2), 1, -1).astype(np.int8), np.zeros(len(p_idx))

    plain = decontaminate(pool, keys, eval_emb, ["e0", "e1", "e2"], components=comp, threshold=0.9).frame
    df, m = decontaminate(
        pool,
        keys,
        eval_emb,
        ["e0", "e1", "e2"],
        components=comp,
        threshold=0.9,
        verifier=verifier,
        verify_k=8,
    )
    assert plain.removed.sum() == 1
    assert df.removed.sum() == 3 and df.removed[[0, 5, 6]].all()
    assert df.reason[5] == "direct" and df.reason[6] == "component" and df.matched_eval_id[6] == "e2"
    assert all(e >= n for _, e in seen) and (0, n + 1) not in seen  # threshold matches are not re-verified
    assert m["verify"] and m["n_added_by_verification"] == 1 and m["n_candidate_pairs"] == 3 * 8 - 1
