"""The `eval` stage: every backbone the pipeline produced, measured with the official frozen-feature protocols
(k-NN, linear probe, linear segmentation; paper §7) next to honest baselines in the same run: a random-init
backbone of the same architecture and raw pixels. A reader sees what pretraining bought.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torchvision import tv_tensors

from dinov2_core.atomic import atomic_path, atomic_write_bytes
from dinov2_core.eval import (
    EvalTransformConfig,
    ExtractedFeatures,
    RawPixelBackbone,
    extract_features,
    extract_patch_grid,
    feature_cache_key,
    knn_classify,
    linear_probe,
    linear_segmentation,
    pca_rgb,
    predict_segmentation,
    save_pca_grid,
    save_segmentation_figure,
    stratified_split,
)
from dinov2_core.eval.unsupervised import feature_statistics, nearest_neighbours, save_retrieval_grid
from tasks.backbones import load_backbone, read_sidecar
from tasks.embeddings import source_digest
from tasks.log import get_logger
from tasks.params import Params, params_record
from tasks.reports import write_json, write_metrics, write_plot_csv
from tasks.stages import EvalParams
from tasks.storage import Storage
from tasks.tables import read_user_table
from tasks.tracking import track_results
from tasks.validation import TableCheck, validate_stage

log = get_logger("eval")

RAW_PIXELS = "raw-pixels"


# ---------------------------------------------------------------------------------------------- data
def _decoded(path: Path, decode) -> torch.Tensor:
    """An evaluation set's image or mask; one that is missing or broken is one line naming it (the sets are inputs
    the pipeline does not ingest, so nothing quarantined it)."""
    try:
        with Image.open(path) as img:
            return decode(img)
    except OSError as exc:  # FileNotFoundError, PIL's UnidentifiedImageError, a truncated file
        raise ValueError(f"evaluation set image {path}: {exc.strerror or exc}") from None


def _read_rgb(paths: list[Path]) -> list[torch.Tensor]:
    return [_decoded(p, lambda img: torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
                     .permute(2, 0, 1)) for p in paths]


def _read_masks(paths: list[Path]) -> list[torch.Tensor]:
    return [_decoded(p, lambda img: torch.from_numpy(np.asarray(img, dtype=np.int64).copy())) for p in paths]


def _transform_batches(images: list[torch.Tensor], targets, ops, batch_size: int, masks: bool = False) -> list:
    """Decoded images -> [(normalised batch, targets)]: one vectorised transform per batch when the images share
    a size (the bundled eval sets), image by image otherwise. Decoding once beats a per-item Dataset here."""
    batches = []
    for i in range(0, len(images), batch_size):
        imgs = images[i: i + batch_size]
        tgts = targets[i: i + batch_size]
        same = len({tuple(t.shape) for t in imgs}) == 1
        if masks:
            pairs = ([ops(tv_tensors.Image(torch.stack(imgs)), tv_tensors.Mask(torch.stack(tgts)[:, None]))]
                     if same else [ops(tv_tensors.Image(x[None]), tv_tensors.Mask(m[None, None])) for x, m in zip(imgs, tgts)])
            x = torch.cat([a.as_subclass(torch.Tensor) for a, _ in pairs])
            y = torch.cat([b.as_subclass(torch.Tensor)[:, 0] for _, b in pairs]).long()
        else:
            x = ops(torch.stack(imgs)) if same else torch.cat([ops(t[None]) for t in imgs])
            y = torch.as_tensor(tgts)
        batches.append((x, y))
    return batches


def _classification(root: Path, split: str) -> tuple[list[torch.Tensor], list[int]]:
    frame = read_user_table(root / f"{split}.csv", "classification split", ("path", "label"))
    return _read_rgb([root / p for p in frame["path"]]), frame["label"].astype(int).tolist()


def _segmentation(root: Path, split: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    frame = read_user_table(root / f"{split}.csv", "segmentation split", ("image", "mask"))
    return _read_rgb([root / p for p in frame["image"]]), _read_masks([root / p for p in frame["mask"]])


def _dataset_id(root: Path, split: str) -> str:
    return hashlib.sha256((root / f"{split}.csv").read_bytes()).hexdigest()[:16]


@dataclass
class Candidate:
    """A backbone under evaluation: a trained export or a baseline."""

    name: str
    kind: str  # trained | random-init | raw-pixels
    model: torch.nn.Module
    crop_size: int
    identity: str  # for the feature cache key
    arch: str

    @property
    def n_last_blocks(self) -> int:
        """The official probe concatenates the last 4 blocks; tiny CPU models may have fewer."""
        return min(4, int(getattr(self.model, "n_blocks", 1)))


def _features(c: Candidate, loader: list, cache_dir: Path | None, dataset_id: str, cfg: EvalTransformConfig,
              keep_patch_grid: bool) -> ExtractedFeatures:
    code = source_digest("dinov2_core", "tasks/eval.py")  # features computed by other code are never reused
    key = feature_cache_key(c.identity, dataset_id, cfg, extra={"grid": keep_patch_grid, "code": code})
    path = cache_dir / f"{key}.pt" if cache_dir else None
    if path is not None and path.exists():
        return ExtractedFeatures.load(path)
    feats = extract_features(c.model, loader, n_last_blocks=c.n_last_blocks, keep_patch_grid=keep_patch_grid,
                             desc=f"features {c.name}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        feats.save(path)
    return feats


# ---------------------------------------------------------------------------------------------- candidates
def _arch_label(hub: str, kwargs: dict) -> str:
    """Architecture identity for pairing a trained backbone with its random-init twin; the input size only
    changes how the positional embedding is stored, so it does not make another architecture."""
    keys = ("embed_dim", "depth", "num_heads", "num_register_tokens", "ffn_layer", "patch_size")
    return f"{hub}({', '.join(f'{k}={kwargs[k]}' for k in keys if k in kwargs)})"


def _candidates(p: EvalParams, storage: Storage, seed: int) -> list[Candidate]:
    out: list[Candidate] = []
    archs: dict[str, tuple[str, dict, int, str]] = {}
    for ref in p.backbones:
        if not storage.exists(ref.weights):
            raise FileNotFoundError(f"eval backbone '{ref.name}': {ref.weights} not found (run its stage first)")
        model = load_backbone(ref.hub, ref.weights, ref.hub_kwargs, storage)
        sidecar = read_sidecar(ref.weights, storage) or {}
        hub = sidecar.get("hub") or ref.hub
        kwargs = {**ref.hub_kwargs, **sidecar.get("hub_kwargs", {})}
        arch = _arch_label(hub, kwargs)
        digest = hashlib.sha256(storage.read_bytes(ref.weights)).hexdigest()[:16]
        crop = ref.crop_size or p.crop_size
        out.append(Candidate(ref.name, "trained", model, crop, f"{ref.name}:{digest}", arch))
        archs.setdefault(arch, (hub, kwargs, crop, ref.name))
    if "random-init" in p.baselines:
        for arch, (hub, kwargs, crop, first) in archs.items():
            torch.manual_seed(seed)  # the official trunc-normal init from a fixed seed
            # LayerScale at 1.0 (the hub default), not the 1e-5 training init: with 1e-5 every residual branch is
            # muted, all images get nearly the same CLS token and k-NN sits at chance -- a strawman baseline.
            model = load_backbone(hub, None, {**kwargs, "init_values": 1.0}, storage)
            out.append(Candidate(f"random-init[{first}]", "random-init", model, crop, f"random:{arch}:{seed}",
                                 arch))
    if "raw-pixels" in p.baselines:
        out.append(Candidate(RAW_PIXELS, "raw-pixels", RawPixelBackbone(patch_size=14, cls_size=32), p.crop_size,
                             "raw-pixels-v1", "raw pixels"))
    return out


# ---------------------------------------------------------------------------------------------- the stage
def evaluate_candidate(c: Candidate, p: EvalParams, seed: int, cache_dir: Path | None) -> tuple[dict, dict]:
    """All three protocols for one backbone; returns (metrics, artefacts for figures)."""
    cls_root, seg_root = Path(p.classification), Path(p.segmentation)
    cfg = EvalTransformConfig(resize_size=max(p.resize_size, c.crop_size), crop_size=c.crop_size)
    ops = cfg.build()
    start = time.perf_counter()
    splits = {s: _classification(cls_root, s) for s in ("train", "test")}
    train, test = (
        _features(c, _transform_batches(*splits[s], ops, p.batch_size), cache_dir, _dataset_id(cls_root, s), cfg,
                  False)
        for s in ("train", "test"))
    classes = int(max(train.targets.max(), test.targets.max()) + 1)

    # k-NN on the full train split; the linear probe's model selection uses a split held out of train
    knn = knn_classify(train.knn_features(), train.targets, test.knn_features(), test.targets,
                       ks=tuple(p.knn_ks), temperature=p.knn_temperature, num_classes=classes)
    tr_idx, val_idx = stratified_split(train.targets, p.val_fraction, seed=seed)
    blocks = tuple(sorted({1, c.n_last_blocks}))  # raw pixels have one "block"
    probe = linear_probe(train.subset(tr_idx), train.subset(val_idx), test, num_classes=classes,
                         learning_rates=tuple(p.linear_lrs), n_last_blocks_grid=blocks, epochs=p.linear_epochs,
                         seed=seed)

    metrics = {
        "kind": c.kind,
        "arch": c.arch,
        "crop_size": c.crop_size,
        "knn": {str(k): v for k, v in knn.items()},
        "knn_top1_best": max(v["top1"] for v in knn.values()),
        "linear": probe.to_dict(),
        "segmentation": None,
        "seconds": 0.0,
    }
    if not has_segmentation(seg_root):  # pictures for the PCA maps come from the classification test images
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        return metrics, {"raw_images": splits["test"][0][:p.n_figure_images]}
    seg_splits = {s: _segmentation(seg_root, s) for s in ("train", "test")}
    seg_batches = {s: _transform_batches(*seg_splits[s], ops, 64, masks=True) for s in ("train", "test")}
    seg_train, seg_test = (
        _features(c, seg_batches[s], cache_dir, _dataset_id(seg_root, s), cfg, True) for s in ("train", "test"))
    n_seg_classes = len((seg_root / "classes.txt").read_text().split())
    seg = linear_segmentation(seg_train, seg_test, n_seg_classes, epochs=p.seg_epochs, lr=p.seg_lr, seed=seed)
    metrics["segmentation"] = seg.to_dict()
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    n_fig = min(p.n_figure_images, len(seg_splits["test"][0]))
    images, masks = seg_batches["test"][0][0][:n_fig], seg_batches["test"][0][1][:n_fig]
    preds = predict_segmentation(seg.head, seg_test.patch_grid[:n_fig], out_size=tuple(masks.shape[-2:]))
    return metrics, {"images": images, "masks": masks, "preds": preds, "classes": n_seg_classes,
                     "raw_images": seg_splits["test"][0][:n_fig]}


def has_segmentation(root: Path) -> bool:
    """A segmentation set is a folder with train.csv, test.csv and classes.txt; a folder without them (a user
    with no masks) means no segmentation probe, said in the metrics rather than failing the stage."""
    return all((root / name).is_file() for name in ("train.csv", "test.csv", "classes.txt"))


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in name).strip("-")


def _save_pca(c: Candidate, images: list[torch.Tensor], figures: Path):
    """PCA map of a trained backbone's patch features, at twice the eval size (a finer patch grid makes a picture
    worth looking at); images are resized one by one (a user's differ in size). Returns the resize it used."""
    size = 2 * c.crop_size
    to_size = EvalTransformConfig(resize_size=size, crop_size=size).build()
    big = torch.stack([to_size(image) for image in images])
    save_pca_grid(figures / f"pca_{_slug(c.name)}.png", big, pca_rgb(extract_patch_grid(c.model, big)))
    return to_size


def has_labels(root: Path) -> bool:
    """A labelled set is train.csv + test.csv (id, path, label); a folder with only images.csv (id, path) is a set
    of unlabelled images for the label-free report."""
    return (root / "train.csv").is_file() and (root / "test.csv").is_file()


def run_eval(params: Params) -> dict:
    p = params.eval
    if not p.backbones:
        raise ValueError("eval.backbones is empty: list the exported backbones to evaluate")
    storage = Storage.from_params(params.storage)
    torch.manual_seed(params.seed)
    cache_dir = Path(p.cache_dir) if p.cache_dir else None
    reports = Path(params.reports)
    figures = reports / "figures" / "eval"
    # the stage owns this folder (one DVC output): a backbone dropped from params must not leave its pictures behind
    shutil.rmtree(figures, ignore_errors=True)
    if not has_labels(Path(p.classification)):
        return run_label_free_eval(params, storage, cache_dir, reports, figures)
    results: dict[str, dict] = {}
    for c in _candidates(p, storage, params.seed):
        log.info("eval: %s (%s)", c.name, c.arch)
        metrics, art = evaluate_candidate(c, p, params.seed, cache_dir)
        results[c.name] = metrics
        if "masks" in art:
            save_segmentation_figure(figures / f"segmentation_{_slug(c.name)}.png", art["images"], art["masks"],
                                     art["preds"], art["classes"])
        if c.kind == "trained":
            _save_pca(c, art["raw_images"], figures)
        seg = metrics["segmentation"]
        log.info("eval: %s k-NN top-1 %.3f, linear %.3f, seg mIoU %s", c.name, metrics["knn_top1_best"],
                 metrics["linear"]["test_top1"], f"{seg['miou']:.3f}" if seg else "n/a (no segmentation set)")

    warnings = _warnings(results)
    validate_stage("eval", _checks(results, p), params.reports)
    plot = pd.DataFrame([{"backbone": name, "k": int(k), "top1": v["top1"]}
                         for name, r in results.items() for k, v in r["knn"].items()])
    write_plot_csv(reports, "eval_knn", plot)
    summary_png(results, figures / "summary.png")
    rows = summary_rows(results)
    summary_md = summary_table(rows, warnings)
    atomic_write_bytes(reports / "eval_summary.md", summary_md.encode())
    payload = {"results": results, "table": rows, "warnings": warnings, "params": params_record(p)}
    track_results(params.tracking, params.reports, "eval", rows, sorted(figures.glob("*.png")))
    write_metrics(reports, "eval", payload)
    write_json(Path(p.out) / "eval.json", payload)
    print(summary_md)
    return payload


# ------------------------------------------------------------------------------------------ without labels
LABEL_FREE_COLUMNS = ("effective_rank", "mean_pair_cosine", "feature_std")


def run_label_free_eval(params: Params, storage: Storage, cache_dir: Path | None, reports: Path,
                        figures: Path) -> dict:
    """No labelled set (a user's own images): per backbone, the statistics of its features on the images of
    `<classification>/images.csv` and, for trained ones, PCA maps and nearest-neighbour examples
    (`dinov2_core.eval.unsupervised`), every figure next to the same baselines."""
    p = params.eval
    index = Path(p.classification) / "images.csv"
    if not index.is_file():
        raise FileNotFoundError(f"eval.classification={p.classification}: no train.csv/test.csv (labels) and no "
                                f"images.csv (unlabelled images) there")
    frame = read_user_table(index, "unlabelled evaluation images", ("path",))
    images = _read_rgb([index.parent / path for path in frame["path"]])
    dataset_id = hashlib.sha256(index.read_bytes()).hexdigest()[:16]
    results: dict[str, dict] = {}
    for c in _candidates(p, storage, params.seed):
        cfg = EvalTransformConfig(resize_size=max(p.resize_size, c.crop_size), crop_size=c.crop_size)
        start = time.perf_counter()
        batches = _transform_batches(images, [0] * len(images), cfg.build(), p.batch_size)
        feats = _features(c, batches, cache_dir, dataset_id, cfg, False).knn_features()
        stats = feature_statistics(feats)
        results[c.name] = {"kind": c.kind, "arch": c.arch, "crop_size": c.crop_size, "images": len(images),
                           **{k: round(v, 4) for k, v in stats.items()},
                           "seconds": round(time.perf_counter() - start, 2)}
        if c.kind == "trained":
            to_size = _save_pca(c, images[:p.n_figure_images], figures)
            save_retrieval_grid(figures / f"neighbours_{_slug(c.name)}.png", [to_size(image) for image in images],
                                nearest_neighbours(feats, p.n_figure_images, 5), f"{c.name}: nearest neighbours")
        log.info("eval: %s effective rank %.1f, mean pair cosine %.3f (no labels)", c.name,
                 stats["effective_rank"], stats["mean_pair_cosine"])
    warnings = _label_free_warnings(results)
    checks = pd.DataFrame([{"backbone": n, **{k: float(r[k]) for k in LABEL_FREE_COLUMNS}} for n, r in results.items()])
    validate_stage("eval", [_label_free_check(checks, p)], params.reports)
    write_plot_csv(reports, "eval_knn", pd.DataFrame(columns=["backbone", "k", "top1"]))  # a declared plot: no k-NN
    rows = [{"backbone": n, "kind": r["kind"], **{k: r[k] for k in LABEL_FREE_COLUMNS}} for n, r in results.items()]
    lines = ["| backbone | kind | effective rank | mean pair cosine | feature std |", "|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['kind']} | {r['effective_rank']:.1f} | {r['mean_pair_cosine']:.3f} | "
              f"{r['feature_std']:.3f} |" for r in rows]
    summary_md = (f"## Evaluation without labels ({len(images)} images; a labelled set adds k-NN and linear)\n\n"
                  + "\n".join(lines) + "\n" + "".join(f"\n> WARNING: {w}\n" for w in warnings))
    atomic_write_bytes(reports / "eval_summary.md", summary_md.encode())
    payload = {"results": results, "table": rows, "warnings": warnings, "labels": False, "params": params_record(p)}
    track_results(params.tracking, params.reports, "eval", rows, sorted(figures.glob("*.png")))
    write_metrics(reports, "eval", payload)
    write_json(Path(p.out) / "eval.json", payload)
    print(summary_md)
    return payload


def _label_free_warnings(results: dict[str, dict]) -> list[str]:
    """Collapse (every image alike) and no more spread than a random-init backbone of the same architecture."""
    out = []
    randoms = {r["arch"]: (name, r) for name, r in results.items() if r["kind"] == "random-init"}
    for name, r in results.items():
        if r["kind"] != "trained":
            continue
        if r["mean_pair_cosine"] > 0.95:
            out.append(f"{name}: mean cosine between different images {r['mean_pair_cosine']:.3f}: the features "
                       "have nearly collapsed to one direction")
        if r["arch"] in randoms and r["effective_rank"] <= randoms[r["arch"]][1]["effective_rank"]:
            base_name, base = randoms[r["arch"]]
            out.append(f"{name}: effective rank {r['effective_rank']:.1f} is not above {base_name}'s "
                       f"({base['effective_rank']:.1f})")
    return out


def _label_free_check(frame: pd.DataFrame, p: EvalParams) -> TableCheck:
    import great_expectations.expectations as gxe

    expected = [b.name for b in p.backbones] + ([RAW_PIXELS] if "raw-pixels" in p.baselines else [])
    return TableCheck("features", frame, [
        gxe.ExpectColumnDistinctValuesToContainSet(column="backbone", value_set=expected),
        *(gxe.ExpectColumnValuesToNotBeNull(column=k) for k in LABEL_FREE_COLUMNS),
        gxe.ExpectColumnValuesToBeBetween(column="effective_rank", min_value=1.0, max_value=None),
        gxe.ExpectColumnValuesToBeBetween(column="mean_pair_cosine", min_value=-1.0001, max_value=1.0001),
    ])


def summary_png(results: dict[str, dict], path: Path) -> Path:
    """One picture of the table: k-NN top-1 against k, linear top-1 and segmentation mIoU, every backbone beside
    its baselines (dashed: random init, dotted: raw pixels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"trained": "-", "random-init": "--", "raw-pixels": ":"}
    names = list(results)
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), gridspec_kw={"width_ratios": [1.3, 1, 1]})
    for name, r in results.items():
        ks = sorted(int(k) for k in r["knn"])
        axes[0].plot(ks, [r["knn"][str(k)]["top1"] for k in ks], style.get(r["kind"], "-"), marker="o", ms=3,
                     color=colours[name], label=name)
    axes[0].set(xscale="log", xlabel="k", ylabel="top-1", title="k-NN (T = 0.07)")
    axes[0].legend(fontsize=7)
    for ax, key, title in ((axes[1], ("linear", "test_top1"), "linear probe top-1"),
                           (axes[2], ("segmentation", "miou"), "linear segmentation mIoU")):
        values = [(results[n][key[0]] or {}).get(key[1], 0.0) for n in names]  # no segmentation set: 0
        bars = ax.barh(range(len(names)), values, color=[colours[n] for n in names])
        for bar, name in zip(bars, names):
            bar.set_hatch({"random-init": "//", "raw-pixels": ".."}.get(results[name]["kind"], ""))
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set(title=title, xlim=(0, 1))
        for i, v in enumerate(values):
            ax.text(v + 0.01, i, f"{v:.3f}", va="center", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def _warnings(results: dict[str, dict]) -> list[str]:
    """Say so when pretraining did not beat a random-init backbone of the same architecture, or raw pixels; each
    is compared at its own best k (the k = 20 column alone can flatter either side)."""
    out = []
    randoms = {r["arch"]: (name, r) for name, r in results.items() if r["kind"] == "random-init"}
    for name, r in results.items():
        if r["kind"] != "trained" or r["arch"] not in randoms:
            continue
        base_name, base = randoms[r["arch"]]
        if r["knn_top1_best"] <= base["knn_top1_best"]:
            out.append(f"{name}: k-NN top-1 {r['knn_top1_best']:.3f} (best k) does not beat {base_name} "
                       f"({base['knn_top1_best']:.3f}); pretraining bought nothing here")
    raw = results.get(RAW_PIXELS)
    if raw:
        behind = [name for name, r in results.items() if r["kind"] == "trained"
                  and r["knn_top1_best"] < raw["knn_top1_best"]]
        if behind:
            out.append(f"raw pixels (k-NN top-1 {raw['knn_top1_best']:.3f} at their best k) beat {', '.join(behind)}: "
                       "at this training budget the learned features are not yet better than the pixels")
    return out


def summary_rows(results: dict[str, dict]) -> list[dict]:
    """One row per backbone and baseline: the figures every report of this stage shows (the Markdown summary, the
    `table` of its metrics, which the flow publishes as a Prefect table artifact)."""
    rows = []
    for name, r in results.items():
        k20 = r["knn"].get("20", next(iter(r["knn"].values())))["top1"]
        seg = r["segmentation"]
        rows.append({"backbone": name, "kind": r["kind"], "knn_top1_k20": round(k20, 4),
                     "knn_top1_best": round(r["knn_top1_best"], 4), "linear_top1": round(r["linear"]["test_top1"], 4),
                     "seg_miou": round(seg["miou"], 4) if seg else None,
                     "seg_pixel_acc": round(seg["pixel_acc"], 4) if seg else None})
    return rows


def summary_table(rows: list[dict], warnings: list[str]) -> str:
    """Markdown table: every metric next to its baselines."""
    lines = [
        "| backbone | kind | k-NN top-1 (k=20) | k-NN best | linear top-1 | seg mIoU | seg pixel acc |",
        "|---|---|---|---|---|---|---|",
    ]
    def cell(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    for r in rows:
        lines.append(f"| {r['backbone']} | {r['kind']} | {cell(r['knn_top1_k20'])} | {cell(r['knn_top1_best'])} | "
                     f"{cell(r['linear_top1'])} | {cell(r['seg_miou'])} | {cell(r['seg_pixel_acc'])} |")
    text = "## Evaluation (frozen features, every backbone next to its baselines)\n\n" + "\n".join(lines) + "\n"
    if warnings:
        text += "\n" + "\n".join(f"> WARNING: {w}" for w in warnings) + "\n"
    return text


def _checks(results: dict[str, dict], p: EvalParams) -> list[TableCheck]:
    import great_expectations.expectations as gxe

    rows = []
    for name, r in results.items():
        for k, v in r["knn"].items():
            rows.append({"backbone": name, "task": f"knn@{k}", "value": v["top1"]})
        rows.append({"backbone": name, "task": "linear", "value": r["linear"]["test_top1"]})
        if r["segmentation"] is not None:
            rows.append({"backbone": name, "task": "seg_miou", "value": r["segmentation"]["miou"]})
            rows.append({"backbone": name, "task": "seg_pixel_acc", "value": r["segmentation"]["pixel_acc"]})
    frame = pd.DataFrame(rows)
    frame["value"] = frame["value"].astype(float)
    expected = [b.name for b in p.backbones] + ([RAW_PIXELS] if "raw-pixels" in p.baselines else [])
    per_backbone = frame.groupby("backbone")["task"].nunique().reset_index()
    return [
        TableCheck("metrics", frame, [
            gxe.ExpectColumnValuesToNotBeNull(column="value"),
            gxe.ExpectColumnValuesToBeBetween(column="value", min_value=0.0, max_value=1.0),
        ]),
        TableCheck("coverage", per_backbone, [
            gxe.ExpectColumnDistinctValuesToContainSet(column="backbone", value_set=expected),
            # every backbone has every protocol the run measured (k-NN at each k, linear, segmentation if a set)
            gxe.ExpectColumnValuesToBeBetween(column="task", min_value=int(frame["task"].nunique()), max_value=None),
        ]),
    ]

