"""`dinov2-pipeline init DATA`: your own images in, the pipeline's inputs and a params profile out.

DATA is a local folder (searched recursively), a glob (`photos/**/*.jpg`) or an `s3://` prefix. `init` writes, under
`inputs/<name>/`, the crawl manifest that ingest reads, an empty seed set (so retrieval curates the pool by
balanced sampling: there is no curated set to start from), the labelled evaluation set built from a
`class_name/*.jpg` folder (train/test split per class; its test images are also what decontamination removes from
the pool; without labels, a random sample of the images themselves, held out the same way, for the label-free
report), and an empty segmentation folder (drop train.csv/test.csv/classes.txt there to add the segmentation
probe). `params.<name>.yaml` is an overlay of params.yaml pointing the stages at them: run it with
`dinov2-pipeline run --profile params.<name>.yaml`.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from tasks.storage import Storage, scheme_of

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass(frozen=True)
class InitResult:
    name: str
    profile: Path
    manifest: Path
    n_images: int
    classes: list[str]
    n_eval_train: int
    n_eval_test: int


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def list_images(data: str, storage: Storage | None = None) -> list[str]:
    """Every image under a folder (recursively), matching a glob, or under an `s3://` prefix, sorted; absolute paths
    for local files. Non-image names are skipped here (ingest quarantines what is not an image after all)."""
    if scheme_of(data) == "s3":
        return [url for url in (storage or Storage()).find(data) if _is_image(url)]
    if any(ch in data for ch in "*?["):
        return sorted(str(Path(p).resolve()) for p in glob.glob(data, recursive=True)
                      if Path(p).is_file() and _is_image(p))
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"init: {data} is not a folder, a glob or an s3:// prefix")
    return sorted(str(p.resolve()) for p in root.rglob("*") if p.is_file() and _is_image(p.name))


def labelled_split(labels_dir: str | Path, test_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                                      list[str]]:
    """(train, test, class names) from a `class_name/*.jpg` folder: per class a fixed random `test_fraction` of its
    images (at least one) goes to test, at least one stays in train."""
    root = Path(labels_dir)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if len(classes) < 2:
        raise ValueError(f"init: --labels {labels_dir} needs at least two class folders of images (class_name/*.jpg)")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, name in enumerate(classes):
        files = sorted(str(p.resolve()) for p in (root / name).rglob("*") if p.is_file() and _is_image(p.name))
        if len(files) < 2:
            raise ValueError(f"init: class '{name}' in {labels_dir} has {len(files)} image(s); it needs two or more")
        order = rng.permutation(len(files))
        n_test = min(len(files) - 1, max(1, round(test_fraction * len(files))))
        for rank, i in enumerate(order.tolist()):
            (test if rank < n_test else train).append({"id": f"{name}/{Path(files[i]).name}", "path": files[i],
                                                       "label": label})
    return pd.DataFrame(train), pd.DataFrame(test), classes


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "mydata"


def init_project(data: str, labels: str | Path | None, name: str | None = None, project: str | Path = ".",
                 test_fraction: float = 0.2, seed: int = 0, storage: Storage | None = None,
                 max_unlabelled: int = 256) -> InitResult:
    """Write `inputs/<name>/` and `params.<name>.yaml` in `project` (see the module docstring)."""
    project = Path(project)
    name = _slug(name or Path(data.rstrip("/*")).name)
    images = list_images(data, storage)
    if not images:
        raise ValueError(f"init: no images ({', '.join(IMAGE_SUFFIXES)}) found in {data}")
    rel = Path("inputs") / name
    root = project / rel
    cls_dir, seg_dir = root / "eval" / "classification", root / "eval" / "segmentation"
    for folder in (cls_dir, seg_dir):
        folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"url": images}).to_csv(root / "crawl.csv", index=False)
    pd.DataFrame(columns=["id", "path"]).to_csv(root / "seed.csv", index=False)  # no seeds: balanced sampling
    if labels is not None:
        train, test, classes = labelled_split(labels, test_fraction, seed)
        train.to_csv(cls_dir / "train.csv", index=False)
        test.to_csv(cls_dir / "test.csv", index=False)
        (cls_dir / "classes.txt").write_text("\n".join(classes) + "\n")
        held_out = f"{rel}/eval/classification/test.csv"
    else:  # no labels: a sample of the images, removed from the training pool, for the label-free report
        local = [u for u in images if scheme_of(u) == "local"]
        if len(local) < 2:
            raise ValueError("init: without --labels the label-free report reads a sample of local images; "
                             f"{data} has {len(local)} (pass --labels DIR for an s3:// crawl)")
        n = min(max_unlabelled, max(2, round(test_fraction * len(local))))
        picked = sorted(np.random.default_rng(seed).choice(len(local), size=n, replace=False).tolist())
        test = pd.DataFrame({"id": [f"{i:07d}-{Path(local[i]).name}" for i in picked],
                             "path": [local[i] for i in picked]})
        test.to_csv(cls_dir / "images.csv", index=False)
        train, classes = test.iloc[:0], []
        held_out = f"{rel}/eval/classification/images.csv"
    (seg_dir / "README.txt").write_text("No segmentation set: add train.csv and test.csv (id, image, mask) and "
                                        "classes.txt here for the linear segmentation probe.\n")
    cls = str(rel / "eval" / "classification")
    overlay = {
        "extends": "params.yaml",
        "profile": name,
        "ingest": {"manifest": str(rel / "crawl.csv"), "allow_outside_root": True},
        "dedup": {"ground_truth": None},
        "decontaminate": {"eval_sets": [{"index": held_out}], "ground_truth": None},
        "retrieve": {"seed_index": str(rel / "seed.csv"), "ground_truth": None},
        # the k-NN monitor during training needs labels
        **{stage: {"monitor": {"eval_dir": cls if labels is not None else None}}
           for stage in ("pretrain", "adapt", "distill")},
        "eval": {"classification": cls, "segmentation": str(rel / "eval" / "segmentation")},
    }
    profile = project / f"params.{name}.yaml"
    header = (f"# Written by `dinov2-pipeline init {data}{f' --labels {labels}' if labels else ''}`: the pipeline on "
              f"these images, an\n"
              f"# overlay of params.yaml (only what differs). Run: dinov2-pipeline run --profile {profile.name}\n")
    profile.write_text(header + yaml.safe_dump(overlay, sort_keys=False))
    return InitResult(name, profile, root / "crawl.csv", len(images), classes, len(train), len(test))
