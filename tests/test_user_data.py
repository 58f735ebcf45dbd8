"""Folder in, model out: `dinov2-pipeline init` on images nobody prepared, and `flows.api.train` end to end on a
folder of real photos that is not the demo data (Debian's OpenCV sample images and MATE/Plasma wallpapers)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tasks.params import load_params
from tasks.user_data import init_project, labelled_split, list_images

from .conftest import SMALL_DEMO, make_project

BIN = Path(sys.executable).parent
OPENCV = Path("/usr/share/doc/opencv-doc/examples/data")
NATURE = [Path("/usr/share/backgrounds/mate/nature"), Path("/usr/share/wallpapers")]


def _fake_images(folder: Path, n: int, colour: tuple[int, int, int]) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.new("RGB", (32 + i, 40), colour).save(path)
        paths.append(path)
    return paths


def test_list_images_walks_folders_and_globs_and_skips_other_files(tmp_path):
    _fake_images(tmp_path / "a" / "deep", 2, (255, 0, 0))
    _fake_images(tmp_path / "b", 1, (0, 255, 0))
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    assert len(list_images(str(tmp_path))) == 3
    assert [Path(p).name for p in list_images(f"{tmp_path}/a/**/*.png")] == ["img0.png", "img1.png"]
    with pytest.raises(FileNotFoundError, match="not a folder, a glob"):
        list_images(str(tmp_path / "missing"))


def test_list_images_reads_an_s3_prefix_from_the_s3_compatible_server(s3_bucket, s3_env, tmp_path):
    """An `s3://` prefix (a real S3-compatible server, keys and endpoint from the environment): every image under
    it, nested keys included, as s3:// URLs the ingest stage fetches; other objects are skipped."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_env, region_name="us-east-1")
    for key in ("crawl/a.jpg", "crawl/deep/b.PNG", "crawl/readme.txt", "other/c.jpg"):
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"bytes")
    assert list_images(f"s3://{s3_bucket}/crawl") == [f"s3://{s3_bucket}/crawl/a.jpg",
                                                      f"s3://{s3_bucket}/crawl/deep/b.PNG"]
    # without labels the label-free report needs local images, and says so in one line
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(ValueError, match="pass --labels DIR for an s3:// crawl"):
        init_project(f"s3://{s3_bucket}/crawl", None, "bucket", tmp_path)


def test_init_of_an_s3_prefix_without_credentials_is_one_line(s3_without_credentials, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import EXIT_CREDENTIALS, app

    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["init", "s3://some-bucket/crawl/"])
    assert res.exit_code == EXIT_CREDENTIALS and "Traceback" not in res.output, res.output[-2000:]
    assert res.stderr.strip() == ("error: s3://some-bucket/crawl/: no S3 credentials: set AWS_ACCESS_KEY_ID and "
                                  "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")


def test_labelled_split_keeps_every_class_in_train_and_test(tmp_path):
    _fake_images(tmp_path / "cats", 10, (255, 0, 0))
    _fake_images(tmp_path / "dogs", 2, (0, 0, 255))
    train, test, classes = labelled_split(tmp_path, 0.2, seed=0)
    assert classes == ["cats", "dogs"]
    assert sorted(test.label.value_counts().to_dict().items()) == [(0, 2), (1, 1)]
    assert sorted(train.label.value_counts().to_dict().items()) == [(0, 8), (1, 1)]
    assert set(train.path).isdisjoint(test.path)
    _fake_images(tmp_path / "one" / "birds", 1, (0, 0, 0))
    _fake_images(tmp_path / "one" / "fish", 3, (0, 0, 0))
    with pytest.raises(ValueError, match="class 'birds'.*1 image"):
        labelled_split(tmp_path / "one", 0.2, seed=0)


def test_init_writes_the_inputs_and_an_overlay_profile_that_validates(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", project / "params.yaml")
    _fake_images(tmp_path / "photos", 5, (10, 20, 30))
    _fake_images(tmp_path / "labelled" / "red", 5, (255, 0, 0))
    _fake_images(tmp_path / "labelled" / "blue", 5, (0, 0, 255))
    result = init_project(str(tmp_path / "photos"), tmp_path / "labelled", "My Photos", project)
    assert result.name == "my-photos" and result.n_images == 5 and result.classes == ["blue", "red"]
    params = load_params(result.profile)
    assert params.profile == "my-photos" and params.ingest.allow_outside_root
    assert pd.read_csv(project / params.ingest.manifest)["url"].tolist() == list_images(str(tmp_path / "photos"))
    assert pd.read_csv(project / params.retrieve.seed_index).empty  # no seed set: balanced curation
    assert (project / params.eval.classification / "test.csv").exists()
    overlay = yaml.safe_load(result.profile.read_text())
    assert overlay["extends"] == "params.yaml" and "model" not in overlay  # an overlay: only what differs
    # no labels: a held-out sample of the images themselves for the label-free report, no k-NN monitor
    unlabelled = init_project(str(tmp_path / "photos"), None, "bare", project, test_fraction=0.4)
    bare = load_params(unlabelled.profile)
    sample = pd.read_csv(project / bare.eval.classification / "images.csv")
    assert len(sample) == 2 and sample["id"].is_unique and unlabelled.classes == []
    assert bare.decontaminate.eval_sets[0].index.endswith("images.csv") and bare.pretrain.monitor.eval_dir is None


def test_init_cli_says_what_to_run_next_and_refuses_in_one_line(tmp_path):
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", tmp_path / "params.yaml")
    _fake_images(tmp_path / "photos", 3, (1, 2, 3))
    _fake_images(tmp_path / "labelled" / "a", 2, (1, 2, 3))
    _fake_images(tmp_path / "labelled" / "b", 2, (3, 2, 1))
    ok = subprocess.run([str(BIN / "dinov2-pipeline"), "init", "photos", "--labels", "labelled"], cwd=tmp_path,
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and "dinov2-pipeline run --profile params.photos.yaml" in ok.stdout, ok.stderr
    bad = subprocess.run([str(BIN / "dinov2-pipeline"), "init", "nowhere", "--labels", "labelled"], cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "nowhere" in bad.stderr


def _real_photos(dest: Path) -> tuple[Path, Path]:
    """A crawl of real photos (OpenCV's sample images + nature wallpapers, one size of each) and a labelled
    folder with the two sources as classes; symlinks, so nothing is copied."""
    opencv = sorted(p for p in OPENCV.iterdir() if p.suffix.lower() in (".jpg", ".png"))[:40]
    nature = sorted(p for root in NATURE if root.is_dir() for p in root.rglob("*.jpg"))
    nature = list({p.parent: p for p in nature}.values())[:40]  # one resolution of each wallpaper
    crawl, labelled = dest / "crawl", dest / "labelled"
    for cls, files in (("opencv", opencv), ("nature", nature)):
        for i, src in enumerate(files):
            for root in (crawl, labelled / cls):
                root.mkdir(parents=True, exist_ok=True)
                (root / f"{cls}-{i}{src.suffix.lower()}").symlink_to(src)
    return crawl, labelled


def _tiny_run() -> list[str]:
    """Small enough for CI (a few steps per training stage, a 2-block model), the full chain of stages."""
    heads = [f"{s}.loss.{h}.{kv}" for s in ("pretrain", "distill") for h in ("dino_head", "ibot_head")
             for kv in ("n_prototypes=64", "hidden_dim=64", "bottleneck_dim=32")]
    train = [f"{s}.{kv}" for s in ("pretrain", "adapt", "distill") for kv in (
        "data.global_batch_size=8", "data.num_workers=0", "optim.epochs=3", "optim.epoch_length=1",
        "optim.warmup_epochs=1", "checkpoint.every=0", "monitor.n_train=40", "monitor.n_test=20")]
    return ([f"demo_data.{k}={v}" for k, v in SMALL_DEMO.items()] + heads + train
            + ["model.depth=2", "model.embed_dim=48", "model.num_heads=3", "launch.omp_threads=1",
               "distill.student.depth=2", "distill.student.embed_dim=48", "distill.student.num_heads=3",
               "pretrain.optim.warmup_teacher_temp_epochs=1", "distill.optim.warmup_teacher_temp_epochs=1",
               "adapt.optim.freeze_last_layer_epochs=0", "eval.linear_epochs=2", "eval.knn_ks=[5, 10]"])


@pytest.mark.slow
@pytest.mark.skipif(not OPENCV.is_dir() or not any(p.is_dir() for p in NATURE),
                    reason="needs Debian's opencv-doc and a wallpaper package (infra/setup-system.sh installs them)")
def test_a_folder_of_real_photos_goes_to_an_evaluated_backbone_with_one_python_call(tmp_path):
    """A folder nobody prepared (no labels): every stage, feature statistics and neighbours on a held-out sample,
    and the distilled student back from one call. The labelled chain (k-NN, linear) runs end to end in
    tests/test_loop.py on the demo data and a labelled folder's inputs are checked by the init test above, so this
    one real-photo run (2.3 minutes) is the label-free one."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.api import train

    crawl, _ = _real_photos(tmp_path / "photos")
    project = make_project(tmp_path / "project", [])
    params_before = (project / "params.yaml").read_bytes()
    with prefect_test_harness():
        weights = train(str(crawl), None, name="photos", project=project, overrides=_tiny_run())
    assert weights.is_file() and weights.name == "student_backbone.pth"
    reports = project / "reports" / "metrics"
    ingest = yaml.safe_load((reports / "ingest.json").read_text())
    assert ingest["input_rows"] == len(list(crawl.iterdir())) == ingest["kept"] + ingest["quarantined"] + \
        ingest["exact_duplicates"]
    retrieve = yaml.safe_load((reports / "retrieve.json").read_text())
    assert retrieve["mode"] == "balanced" and retrieve["seeds"] == 0 and retrieve["curated"] > 0
    decontam = yaml.safe_load((reports / "decontaminate.json").read_text())
    assert decontam["removed"] > 0  # the held-out photos are in the crawl too: they leave the training pool
    evaluation = yaml.safe_load((reports / "eval.json").read_text())
    names = {r["backbone"] for r in evaluation["table"]}
    assert evaluation["labels"] is False and names >= {"pretrain-teacher", "distill-student", "raw-pixels"}
    assert all(r["effective_rank"] >= 1.0 for r in evaluation["table"])
    assert (project / "params.yaml").read_bytes() == params_before  # the run's params lived in the run view
