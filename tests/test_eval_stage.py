"""The eval stage: every backbone next to its baselines, the protocols' outputs, reports and checks."""

from __future__ import annotations

import json

import pytest
import torch

from flows.artifacts import metrics_table
from tasks.eval import _checks, run_eval, summary_rows, summary_table
from tasks.validation import DataQualityError, validate_stage


@pytest.fixture(scope="module")
def fake_export(tmp_path_factory):
    """An 'exported' backbone the way the training stages write it: official state dict + model.json."""
    from dinov2_core.hub import dinov2_vits14

    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(7)
    model = dinov2_vits14(pretrained=False, depth=2, img_size=56, embed_dim=96, num_heads=3)
    torch.save(model.state_dict(), root / "teacher_backbone.pth")
    kwargs = {"depth": 2, "img_size": 56, "embed_dim": 96, "num_heads": 3}
    (root / "model.json").write_text(json.dumps({"hub": {"constructor": "dinov2_core.hub.dinov2_vits14",
                                                         "kwargs": kwargs}}))
    return root / "teacher_backbone.pth"


@pytest.fixture(scope="module")
def evaluated(fake_export, demo_dir, small_params_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    d = demo_dir / "demo" / "eval"
    params = small_params_factory(demo_dir, [
        f"eval.backbones=[{{name: untrained-teacher, weights: {fake_export}}}]",
        f"eval.classification={d}/classification", f"eval.segmentation={d}/segmentation",
        f"eval.cache_dir={root}/cache", f"eval.out={root}/out", f"reports={root}/reports",
        "eval.linear_epochs=3", "eval.seg_epochs=3", "eval.linear_lrs=[0.001, 0.01]",
    ])
    stale = root / "reports" / "figures" / "eval" / "pca_a-backbone-no-longer-listed.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    payload = run_eval(params)
    return params, root, payload


def test_every_backbone_and_baseline_is_measured(evaluated):
    _, _root, payload = evaluated
    results = payload["results"]
    kinds = {r["kind"] for r in results.values()}
    assert kinds == {"trained", "random-init", "raw-pixels"}
    for name, r in results.items():
        # 100 train images: k is capped at the train size, so 100 and 200 collapse to 100
        assert set(r["knn"]) == {"10", "20", "100"}, name
        assert "top5" in r["knn"]["10"]  # 10 classes > 5
        assert 0.0 <= r["linear"]["test_top1"] <= 1.0 and 0.0 <= r["segmentation"]["miou"] <= 1.0
        assert r["linear"]["best"]["n_last_blocks"] in (1, 2)  # a depth-2 model has 2 blocks to concatenate
    raw = results["raw-pixels"]
    assert raw["knn_top1_best"] > 0.5  # raw pixels of Fashion-MNIST are a strong baseline


def test_reports_written(evaluated):
    _, root, payload = evaluated
    reports = root / "reports"
    assert json.loads((reports / "metrics" / "eval.json").read_text())["results"].keys() == payload["results"].keys()
    plot = (reports / "plots" / "eval_knn.csv").read_text().splitlines()
    assert plot[0] == "backbone,k,top1" and len(plot) == 1 + 3 * len(payload["results"])
    summary = (reports / "eval_summary.md").read_text()
    for name in payload["results"]:
        assert name in summary
    # the same rows as a table in the metrics, which the flow publishes as a Prefect table artifact
    table = metrics_table(reports / "metrics" / "eval.json")
    assert [r["backbone"] for r in table] == list(payload["results"])
    for row in table:
        result = payload["results"][row["backbone"]]
        assert row["linear_top1"] == round(result["linear"]["test_top1"], 4) and f"{row['seg_miou']:.3f}" in summary
    figures = {p.name for p in (reports / "figures" / "eval").iterdir()}
    assert {"pca_untrained-teacher.png", "segmentation_raw-pixels.png", "summary.png"} <= figures
    assert "pca_a-backbone-no-longer-listed.png" not in figures  # the stage's folder holds this run's pictures only


def test_untrained_backbone_gets_a_warning():
    results = {
        "teacher": {"kind": "trained", "arch": "a", "knn_top1_best": 0.50, "knn": {"20": {"top1": 0.5}},
                    "linear": {"test_top1": 0.5}, "segmentation": {"miou": 0.1, "pixel_acc": 0.6}},
        "random-init a": {"kind": "random-init", "arch": "a", "knn_top1_best": 0.55, "knn": {"20": {"top1": 0.55}},
                          "linear": {"test_top1": 0.5}, "segmentation": {"miou": 0.1, "pixel_acc": 0.6}},
    }
    from tasks.eval import _warnings

    warnings = _warnings(results)
    assert len(warnings) == 1 and "does not beat random-init a" in warnings[0]
    assert "WARNING" in summary_table(summary_rows(results), warnings)
    results["teacher"]["knn_top1_best"] = 0.8
    assert _warnings(results) == []


def test_nan_metric_fails_the_check(evaluated, tmp_path):
    params, _, payload = evaluated
    broken = json.loads(json.dumps(payload["results"]))
    broken["raw-pixels"]["segmentation"]["miou"] = float("nan")
    with pytest.raises(DataQualityError, match="expect_column_values_to_not_be_null"):
        validate_stage("eval", _checks(broken, params.eval), tmp_path)
    missing = {k: v for k, v in payload["results"].items() if k != "untrained-teacher"}
    with pytest.raises(DataQualityError, match="expect_column_distinct_values_to_contain_set"):
        validate_stage("eval", _checks(missing, params.eval), tmp_path)


def test_a_folder_without_segmentation_masks_skips_only_the_segmentation_probe(evaluated, tmp_path):
    """A user with labelled images but no masks: k-NN and the linear probe run, segmentation is reported as absent
    (n/a in the table, no segmentation figures, no GX rows), the PCA maps still come from test images."""
    params, _, full = evaluated
    p = params.model_copy(deep=True)
    (tmp_path / "no-masks").mkdir()
    p.eval.segmentation, p.eval.out, p.reports = str(tmp_path / "no-masks"), str(tmp_path / "out"), str(tmp_path / "r")
    payload = run_eval(p)
    for name, r in payload["results"].items():
        assert r["segmentation"] is None and r["knn"] == full["results"][name]["knn"]  # same features, cached
    assert all(row["seg_miou"] is None for row in payload["table"])
    assert "| n/a | n/a |" in (tmp_path / "r" / "eval_summary.md").read_text()
    figures = {f.name for f in (tmp_path / "r" / "figures" / "eval").iterdir()}
    assert "pca_untrained-teacher.png" in figures and not any(f.startswith("segmentation_") for f in figures)


def test_without_labels_the_stage_reports_feature_statistics_and_neighbours(evaluated, tmp_path):
    """A folder of unlabelled images (images.csv: id, path): per backbone and baseline the spread of its features
    (effective rank, mean cosine between images), PCA maps and nearest-neighbour examples of the trained one, the
    same GX gate; the k-NN plot the pipeline declares is written empty."""
    import pandas as pd

    params, _, _ = evaluated
    labelled = pd.read_csv(f"{params.eval.classification}/test.csv")
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    pd.DataFrame({"id": labelled["id"], "path": [f"{params.eval.classification}/{p}" for p in labelled["path"]]}
                 ).to_csv(folder / "images.csv", index=False)
    p = params.model_copy(deep=True)
    p.eval.classification, p.eval.out, p.reports = str(folder), str(tmp_path / "out"), str(tmp_path / "r")
    payload = run_eval(p)
    assert payload["labels"] is False
    assert {r["backbone"] for r in payload["table"]} == {"untrained-teacher", "random-init[untrained-teacher]",
                                                        "raw-pixels"}
    for r in payload["results"].values():
        assert r["images"] == len(labelled) and r["effective_rank"] >= 1.0 and -1 <= r["mean_pair_cosine"] <= 1
    figures = {f.name for f in (tmp_path / "r" / "figures" / "eval").iterdir()}
    assert {"pca_untrained-teacher.png", "neighbours_untrained-teacher.png"} <= figures
    assert (tmp_path / "r" / "plots" / "eval_knn.csv").read_text().strip() == "backbone,k,top1"
    assert "without labels" in (tmp_path / "r" / "eval_summary.md").read_text()


def test_a_broken_or_missing_evaluation_image_or_index_is_one_line_naming_it(tmp_path):
    """The evaluation sets are inputs the pipeline does not ingest: nothing quarantined their files."""
    from PIL import Image

    from tasks.eval import _classification

    (tmp_path / "test").mkdir()
    Image.new("RGB", (28, 28)).save(tmp_path / "test" / "a.png")
    (tmp_path / "test" / "b.png").write_bytes(b"not a png")
    (tmp_path / "test.csv").write_text("id,path,label\n1,test/a.png,0\n2,test/b.png,1\n")
    with pytest.raises(ValueError, match=r"^evaluation set image .*b.png: cannot identify image file"):
        _classification(tmp_path, "test")
    (tmp_path / "test.csv").write_text("id,path,label\n1,test/a.png,0\n2,test/gone.png,1\n")
    with pytest.raises(ValueError, match=r"^evaluation set image .*gone.png: No such file or directory$"):
        _classification(tmp_path, "test")
    (tmp_path / "test.csv").write_text("id,file,label\n1,test/a.png,0\n")
    with pytest.raises(ValueError, match=r"^classification split .*test.csv: no 'path' column"):
        _classification(tmp_path, "test")
