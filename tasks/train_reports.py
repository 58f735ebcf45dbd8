"""The reports of the training stages: the per-step log as a DVC plot CSV, loss and learning-vs-collapse figures,
great-expectations checks of the log and the exports, and the metrics file with one-line warnings."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from dinov2_core.atomic import atomic_path
from dinov2_core.hub import load_export
from dinov2_core.train.diagnostics import learning_warnings
from dinov2_core.train.engine import KnnLog, TrainLog
from tasks.log import get_logger
from tasks.params import Params
from tasks.reports import write_metrics, write_plot_csv
from tasks.validation import TableCheck, validate_stage

log = get_logger("train")


def _save_figure(fig, path: Path) -> Path:
    """Write ``fig`` atomically (a reader never sees half a PNG) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def read_log(run_dir: Path):
    path = run_dir / "log.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=list(TrainLog.COLUMNS))


def loss_curve_png(frame, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for col, label in (("loss_total", "total"), ("loss_dino", "DINO"), ("loss_ibot", "iBOT"), ("loss_koleo", "KoLeo")):
        if col in frame and len(frame):
            axes[0].plot(frame["step"], frame[col], label=label, lw=1)
    axes[0].set(xlabel="iteration", ylabel="loss", title=title)
    axes[0].legend(fontsize=8)
    if len(frame):
        axes[1].plot(frame["step"], frame["lr"], label="lr")
        axes[1].plot(frame["step"], frame["last_layer_lr"], label="last-layer lr", ls="--")
        ax2 = axes[1].twinx()
        ax2.plot(frame["step"], frame["wd"], color="gray", label="wd")
        axes[2].plot(frame["step"], frame["teacher_temp"], label="teacher temp")
        ax3 = axes[2].twinx()
        ax3.plot(frame["step"], frame["momentum"], color="tab:orange", label="EMA momentum")
        ax3.legend(fontsize=8, loc="lower right")
    axes[1].set(xlabel="iteration", title="lr (left), wd (right)")
    axes[1].legend(fontsize=8)
    axes[2].set(xlabel="iteration", title="teacher temperature (left), EMA momentum (right)")
    axes[2].legend(fontsize=8)
    return _save_figure(fig, path)


def read_knn_log(run_dir: Path):
    path = run_dir / "knn.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=list(KnnLog.COLUMNS))


def prototype_counts(loss) -> dict[str, int]:
    """{"dino": K, "ibot": K'} of a LossConfig or its dict (the ln K references of the diagnostics)."""
    get = (lambda o, k: o[k]) if isinstance(loss, dict) else getattr
    dino = int(get(get(loss, "dino_head"), "n_prototypes"))
    ibot = int(get(get(loss, "ibot_head"), "n_prototypes")) if get(loss, "ibot_separate_head") else dino
    return {"dino": dino, "ibot": ibot}


def learning_curve_png(frame, knn, path: Path, title: str, n_prototypes: dict[str, int], embed_dim: int) -> Path:
    """The learning-vs-collapse picture: DINO / iBOT losses next to the teacher's target entropy and ln K (targets at
    ln K: no signal), the CLS feature spread next to 1/sqrt(D) (towards 0: collapse), and k-NN vs images seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    has = lambda c: c in frame and len(frame) and frame[c].notna().any()
    for ax, head in ((axes[0], "dino"), (axes[1], "ibot")):
        for col, label, style in ((f"teacher_entropy_{head}", "teacher target entropy", "-"),
                                  (f"student_entropy_{head}", "student entropy", "--")):
            if has(col):
                ax.plot(frame["step"], frame[col], lw=1, ls=style, label=label)
        k = n_prototypes.get(head)
        if k:
            ax.axhline(math.log(k), color="k", lw=0.8, ls=":", label=f"ln K = {math.log(k):.2f} (uniform)")
        ax.set(xlabel="iteration", ylabel="nats", title=f"{title}: {'DINO (CLS)' if head == 'dino' else 'iBOT (patches)'}")
    if has("loss_dino"):  # cross-entropy = teacher entropy + KL: the gap to the teacher entropy is what is learnt
        axes[0].plot(frame["step"], frame["loss_dino"], lw=1, label="DINO loss (cross-entropy)")
    if has("loss_ibot"):  # official normalisation: a mean over all global crops, masked or not
        twin = axes[1].twinx()
        twin.plot(frame["step"], frame["loss_ibot"], lw=0.8, color="tab:green", label="iBOT loss (right)")
        twin.legend(fontsize=7, loc="lower right")
    for ax in axes[:2]:
        ax.legend(fontsize=7, loc="lower left")
    if has("cls_std"):
        axes[2].plot(frame["step"], frame["cls_std"], lw=1, label="CLS per-dim std")
    axes[2].axhline(1 / math.sqrt(embed_dim), color="k", lw=0.8, ls=":", label="1/sqrt(D): spread")
    axes[2].set_ylim(bottom=0)
    if has("loss_koleo"):
        ax2 = axes[2].twinx()
        ax2.plot(frame["step"], frame["loss_koleo"], color="tab:orange", lw=0.8, label="KoLeo")
        ax2.legend(fontsize=7, loc="lower right")
    axes[2].set(xlabel="iteration", title="feature spread (left), KoLeo (right)")
    axes[2].legend(fontsize=7, loc="lower left")
    if len(knn):
        axes[3].plot(knn["images_seen"], knn["knn_top1"], marker="o")
    axes[3].set(xlabel="images seen", ylabel="k-NN top-1", title="k-NN monitor during training")
    return _save_figure(fig, path)


def learning_summary(stage: str, frame, knn, n_prototypes: dict[str, int], embed_dim: int,
                     tail: int = 20) -> dict[str, Any]:
    """End-of-run diagnostics for the metrics file: means over the last iterations, the k-NN curve, warnings."""
    end = frame.tail(min(tail, len(frame))) if len(frame) else frame
    mean = lambda c: float(end[c].mean()) if c in end and len(end) and end[c].notna().any() else None
    out: dict[str, Any] = {f"{c}_end_mean": mean(c) for c in
                           ("teacher_entropy_dino", "teacher_entropy_ibot", "student_entropy_dino", "cls_std")}
    out["ln_k_dino"] = math.log(n_prototypes["dino"])
    if mean("loss_dino") is not None and out["teacher_entropy_dino_end_mean"] is not None:
        out["dino_kl_gap_end_mean"] = mean("loss_dino") - out["teacher_entropy_dino_end_mean"]
    out["knn_vs_images_seen"] = [{"images_seen": int(r.images_seen), "top1": float(r.knn_top1)}
                                 for r in knn.itertuples()]
    out["warnings"] = learning_warnings(stage, dino_loss_end=mean("loss_dino"), n_prototypes=n_prototypes["dino"],
                                        cls_std_end=out["cls_std_end_mean"], embed_dim=embed_dim)
    for w in out["warnings"]:
        log.warning(w)
    return out


def log_checks(frame, total_steps: int):
    """GX suite of the training log: one row per iteration, finite losses, schedules in range."""
    import great_expectations.expectations as gxe

    finite = frame.copy()
    for col in ("loss_total", "loss_dino", "loss_ibot", "loss_koleo"):
        finite[col + "_finite"] = [math.isfinite(float(v)) for v in frame[col]] if len(frame) else []
    return TableCheck("log", finite, [
        gxe.ExpectTableRowCountToEqual(value=total_steps),
        gxe.ExpectColumnValuesToBeUnique(column="step"),
        gxe.ExpectColumnValuesToBeBetween(column="step", min_value=0, max_value=max(0, total_steps - 1)),
        *[gxe.ExpectColumnValuesToBeInSet(column=c + "_finite", value_set=[True])
          for c in ("loss_total", "loss_dino", "loss_ibot", "loss_koleo")],
        gxe.ExpectColumnValuesToBeBetween(column="lr", min_value=0.0),
        gxe.ExpectColumnValuesToBeBetween(column="momentum", min_value=0.0, max_value=1.0),
    ])


def export_checks(export_dir: Path, names: list[str]):
    import great_expectations.expectations as gxe

    rows = []
    for name in names:
        ok, reason = True, ""
        try:
            load_export(export_dir / "model.json", name)
        except Exception as exc:  # the check records why
            ok, reason = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        rows.append({"file": name, "loads_strict": ok, "reason": reason})
    frame = pd.DataFrame(rows, columns=["file", "loads_strict", "reason"])
    return TableCheck("export", frame, [gxe.ExpectColumnValuesToBeInSet(column="loads_strict", value_set=[True]),
                                        gxe.ExpectTableRowCountToEqual(value=len(names))])


def summarise_log(frame, tail: int = 20) -> dict[str, Any]:
    if not len(frame):
        return {}
    head = frame.head(min(tail, len(frame)))
    end = frame.tail(min(tail, len(frame)))
    out = {
        "iterations": len(frame),
        "loss_first": float(frame["loss_total"].iloc[0]),
        "loss_last": float(frame["loss_total"].iloc[-1]),
        "loss_start_mean": float(head["loss_total"].mean()),
        "loss_end_mean": float(end["loss_total"].mean()),
        "images_per_s_median": float(frame["images_per_s"].iloc[1:].median()) if len(frame) > 1 else None,
        "data_wait_fraction_median": data_wait_fraction(frame),
    }
    for k in ("dino", "ibot", "koleo"):
        out[f"{k}_start_mean"] = float(head[f"loss_{k}"].mean())
        out[f"{k}_end_mean"] = float(end[f"loss_{k}"].mean())
    return out


INPUT_BOUND_FRACTION = 0.3  # a third of every step spent waiting for the batch: the loader, not the model, sets the pace


def data_wait_fraction(frame) -> float | None:
    """Median share of an iteration spent waiting for its batch (the first iteration, which starts the loader, left
    out): the time the loader's work is not hidden behind the model's."""
    if "data_s" not in frame or len(frame) < 2:
        return None
    rest = frame.iloc[1:]
    share = (rest["data_s"] / rest["step_s"]).where(rest["step_s"] > 0)
    return float(share.median()) if share.notna().any() else None


def input_warning(stage: str, fraction: float | None, num_workers: int) -> list[str]:
    """One line when the run is input-bound, naming the knob: on a GPU the loader is what limits a small model."""
    if fraction is None or fraction < INPUT_BOUND_FRACTION:
        return []
    line = (f"{stage}: input-bound: {fraction:.0%} of each iteration waits for its batch (median), so the model "
            f"idles; raise {stage}.data.num_workers (now {num_workers}; {stage}.data.streams a multiple of it) to decode "
            "and augment in parallel processes, one per spare core")
    return [line]


def write_training_reports(stage: str, params: Params, run_dir: Path, total_steps: int, export_dir: Path,
                           export_names: list[str], metrics: dict[str, Any], n_prototypes: dict[str, int],
                           embed_dim: int) -> dict[str, Any]:
    """Per-step CSV, k-NN-during-training CSV, loss and learning figures, GX checks, metrics with warnings.
    ``n_prototypes`` ({"dino": K, "ibot": K'}) and ``embed_dim`` (student) set the ln K / 1/sqrt(D) references."""
    frame, knn = read_log(run_dir), read_knn_log(run_dir)
    write_plot_csv(params.reports, stage, frame)
    write_plot_csv(params.reports, f"{stage}_knn", knn)
    figures = Path(params.reports) / "figures"
    loss_curve_png(frame, figures / f"{stage}_loss.png", f"{stage} losses")
    learning_curve_png(frame, knn, figures / f"{stage}_learning.png", stage, n_prototypes, embed_dim)
    validate_stage(stage, [log_checks(frame, total_steps), export_checks(export_dir, export_names)], params.reports)
    metrics = {**summarise_log(frame), **learning_summary(stage, frame, knn, n_prototypes, embed_dim), **metrics}
    slow = input_warning(stage, metrics.get("data_wait_fraction_median"), getattr(params, stage).data.num_workers)
    for w in slow:
        log.warning(w)
    metrics["warnings"] = [*metrics.get("warnings", []), *slow]
    write_metrics(params.reports, stage, metrics)
    return metrics
