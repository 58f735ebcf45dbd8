import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmarks.copy_detection_corpora import (
    choose_threshold,
    eval_match_rates,
    evaluate_thresholds,
    near_duplicate,
)

from ._util import unit


def test_pair_precision_counts_chained_false_pairs():
    # originals 0,1,2 ; copy 3 of 0 ; 1 and 2 are distinct but close to 0 (cos 0.95)
    base = np.eye(4, dtype=np.float32)
    x = unit(
        np.stack([base[0], base[0] + 0.33 * base[1], base[0] + 0.33 * base[2], base[0] + 0.01 * base[3]])
    )
    source = np.array([0, 1, 2, 0])
    is_copy = np.array([False, False, False, True])
    t = evaluate_thresholds(x, source, is_copy, [0.99, 0.9], k=3).set_index("threshold")
    assert t.loc[0.99, "recall"] == 1.0 and t.loc[0.99, "pair_precision"] == 1.0
    # at 0.9 everything is one component: 6 pairs, 1 true -> precision 1/6, 3 distinct items merged
    assert t.loc[0.9, "pair_precision"] == pytest.approx(1 / 6)
    assert t.loc[0.9, "distinct_merged"] == 3 and t.loc[0.9, "false_pairs"] == 5


def test_choose_threshold_takes_middle_of_feasible_interval_or_none():
    table = pd.DataFrame(
        {
            "threshold": [0.90, 0.92, 0.94, 0.96, 0.98],
            "recall": [1.0, 0.99, 0.97, 0.95, 0.80],
            "pair_precision": [0.5, 0.99, 0.995, 1.0, 1.0],
        }
    )
    assert choose_threshold(table) == pytest.approx(0.94)
    assert choose_threshold(table, min_recall=0.999) is None


def test_eval_match_rates():
    e = np.eye(3, dtype=np.float32)
    pool = unit(np.array([[1, 0.05, 0], [0, 0, 1], [0.5, 0.5, 0.5]], dtype=np.float32))
    r = eval_match_rates(pool, e, np.array([True, True, False]), [0.9]).iloc[0]
    assert r.recall == 1.0 and r.false_flag_rate == 0.0


def test_near_duplicate_applies_only_requested_transforms():
    rng = np.random.default_rng(0)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    out, p = near_duplicate(img, rng, transforms=("flip",))
    assert p == {"transforms": "flip", "flip": True}
    assert np.array_equal(np.asarray(out), np.asarray(img)[:, ::-1])
    out, p = near_duplicate(img, rng, transforms=("crop", "grey", "resize", "jpeg"))
    assert out.mode == "L" and out.format == "JPEG" and 30 <= p["quality"] <= 95
    l, t, r, b = p["crop"]
    assert max(l, r) <= 5 and max(t, b) <= 4
    with pytest.raises(ValueError):
        near_duplicate(img, rng, transforms=("rotate",))
