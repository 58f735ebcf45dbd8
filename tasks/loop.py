"""The curation loop: a model selects the data its successor trains on (the idea behind LVD-142M, paper §3).

Round 1 is the pipeline as it stands, curated with the model-free copy-detection descriptor. Each later round is
named in ``loop.rounds`` with the export that curates it (``round-2: data/pretrain/export``): its retrieval embeds
the pool and the seed set with that exported teacher, then its shards, a pre-training from scratch on them and an
evaluation of the new teacher follow. A round is the same stages with other params: :func:`round_overrides` lists
them as ``key=value`` overrides (its outputs under ``<loop.out>/<round>/``, its reports under
``<reports>/<round>/``), and the rendered dvc.yaml has one DVC ``foreach`` stage per round stage whose paths come
from the same table (:data:`ROUND_PATHS`), so ``dvc repro`` runs, skips and resumes rounds like any stage.

Dedup and decontamination are not redone in later rounds: they find copies, which the copy-detection descriptor is
made for (the paper uses a copy-detection model for both and its ViT only for retrieval).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dinov2_core.atomic import atomic_write_bytes
from tasks.storage import scheme_of

if TYPE_CHECKING:
    from tasks.params import Params

ROUND_STAGES = ("retrieve", "shards", "pretrain", "eval")
# Each param a later round moves, and where it goes under the round's folder `<loop.out>/<round>`.
ROUND_PATHS = {
    "retrieve.out": "retrieve",
    "shards.curated": "retrieve/curated.parquet",
    "shards.index_copy": "shards/shards.json",
    "pretrain.data.shards": "shards/shards.json",
    "pretrain.out": "pretrain",
    "eval.out": "eval",
}
# shards.out may be an s3:// prefix; dvc.yaml tracks the local folder of the index copy (tasks/stages.py)
SHARDS_FOLDER = ("data/shards", "shards")
EXPORT_WEIGHTS = "teacher_backbone.pth"  # what a pretrain export holds (tasks/pretrain.py)


def round_folder(params: Params, name: str) -> str:
    return f"{params.loop.out}/{name}"


def round_overrides(params: Params, name: str) -> list[str]:
    """The ``key=value`` overrides that turn the project's params into round ``name``'s."""
    if name not in params.loop.rounds:
        raise ValueError(f"round {name!r} is not in loop.rounds ({', '.join(params.loop.rounds) or 'none'})")
    root = round_folder(params, name)
    curate_with = params.loop.rounds[name].rstrip("/")
    sets = [f"{key}={root}/{rel}" for key, rel in ROUND_PATHS.items()]
    shards_out = params.shards.out
    sets.append(f"shards.out={shards_out.rstrip('/')}/{name}" if scheme_of(shards_out) != "local" else f"shards.out={root}/shards")
    sets += [
        "retrieve.embedder.kind=dinov2",
        f"retrieve.embedder.weights={curate_with}/{EXPORT_WEIGHTS}",  # its model.json beside it says the arch
        f"retrieve.embedder.image_size={params.pretrain.crops.global_crops_size}",
        f"eval.backbones=[{{name: {name}-teacher, weights: {root}/pretrain/export/{EXPORT_WEIGHTS}}}]",
        "eval.baselines=[]",  # raw pixels and random init do not change between rounds: round 1 has them
        f"reports={params.reports}/{name}",
    ]
    return sets


def round_params(params_file: str | Path, name: str, overrides: list[str] | None = None) -> Params:
    from tasks.params import load_params

    base = load_params(params_file, overrides)
    return load_params(params_file, [*(overrides or []), *round_overrides(base, name)])


# --------------------------------------------------------------------------------------- round against round
def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def round_rows(params: Params, upto: str | None = None) -> list[dict[str, Any]]:
    """One row per round that has run (round 1 = the project's own reports): what its curation kept, how clean
    that was on the ground truth, and its pre-trained teacher's evaluation; raw pixels and random init once, from
    round 1's eval."""
    base = Path(params.reports)
    later = list(params.loop.rounds)
    later = later[: later.index(upto) + 1] if upto in later else later
    rounds = {"round-1": base, **{name: base / name for name in later}}
    rows = []
    first_eval = _read(base / "metrics" / "eval.json").get("results", {})
    for name, reports in rounds.items():
        retrieve = _read(reports / "metrics" / "retrieve.json")
        results = _read(reports / "metrics" / "eval.json").get("results", {})
        if not retrieve:
            continue
        teacher = next((r for n, r in results.items() if n in (f"{name}-teacher", "pretrain-teacher")), None)
        q = retrieve.get("quality") or {}
        kind = ((retrieve.get("params") or {}).get("embedder") or {}).get("kind", "?")
        rows.append(_row(name, kind, retrieve, q, teacher))
    for baseline in ("raw-pixels", "random-init"):  # random init is named after the backbone it copies
        names = (baseline, f"{baseline}[pretrain-teacher]")  # the rounds' teachers have the pretrain architecture
        match = next((n for n in first_eval if n in names), None) or next(
            (n for n in first_eval if n.startswith(f"{baseline}[")), None)
        if match:
            rows.append(_row(match, "-", {}, {}, first_eval[match]))
    return rows


def _row(name: str, embedder: str, retrieve: dict, quality: dict, result: dict | None) -> dict[str, Any]:
    seg = (result or {}).get("segmentation") or {}
    return {"round": name, "curated_with": embedder, "curated": retrieve.get("curated"),
            "pool": retrieve.get("pool"),
            "curated_in_domain_share": quality.get("curated_in_domain_share"),
            "in_domain_recall": quality.get("in_domain_recall"),
            "off_domain_kept": ", ".join(f"{k} {v}" for k, v in (quality.get("curated_off_domain_by_kind") or {})
                                         .items()) or None,
            "pool_in_domain_share": quality.get("pool_in_domain_share"),
            "knn_top1": (result or {}).get("knn_top1_best"),
            "linear_top1": ((result or {}).get("linear") or {}).get("test_top1"),
            "seg_miou": seg.get("miou")}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def round_table(rows: list[dict[str, Any]]) -> str:
    cols = ["round", "curated_with", "pool", "curated", "curated_in_domain_share", "in_domain_recall",
            "off_domain_kept", "knn_top1", "linear_top1", "seg_miou"]
    head = ["round", "curated with", "pool", "curated", "in-domain share of curated", "in-domain recall",
            "off-domain kept, by kind", "k-NN top-1 (best k)", "linear top-1", "seg mIoU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_round_report(params: Params, name: str) -> dict[str, Any]:
    """After round ``name``'s evaluation: `<reports>/<name>/loop.md` and `.../metrics/loop.json`, every round that
    has run so far side by side (``params``: the project's, not the round's)."""
    from tasks.reports import write_metrics

    reports = Path(params.reports) / name
    rows = round_rows(params, upto=name)
    table = round_table(rows)
    text = ("## The curation loop, round against round\n\nRound 1 curates with the model-free copy-detection "
            "descriptor, each later round with the previous round's exported teacher; in-domain share and recall "
            "are measured on the demo crawl's ground truth (never used to decide).\n\n" + table)
    atomic_write_bytes(reports / "loop.md", text.encode())
    write_metrics(reports, "loop", {"rounds": rows})
    print(text)
    return {"rows": rows, "markdown": text}


def rounds_setting(n: int, pretrain_out: str, loop_out: str) -> str:
    """The ``loop.rounds`` override for ``--rounds n``: round k curated by round k-1's pre-training export."""
    if n < 1:
        raise ValueError(f"--rounds must be >= 1, got {n}")
    rounds = {f"round-{k}": pretrain_out if k == 2 else f"{loop_out}/round-{k - 1}/pretrain"
              for k in range(2, n + 1)}
    return "loop.rounds={" + ", ".join(f"{k}: {v}/export" for k, v in rounds.items()) + "}"


# ----------------------------------------------------------------------------------------- names in dvc.yaml
FOREACH_SUFFIX = "-round"


def dvc_stage(stage: str, name: str) -> str:
    """The DVC name of a stage's run in round ``name`` (dvc.yaml's foreach stage `<stage>-round`, one per round)."""
    return f"{stage}{FOREACH_SUFFIX}@{name}"


def round_dvc_path(path: str) -> str:
    """A registry path (`${section.key}/...`) as dvc.yaml's round stages write it: the keys a round moves point into
    `${loop.out}/${key}/` (``key``: the round's name in DVC's foreach), reports into `${reports}/${key}`."""
    for key, rel in ROUND_PATHS.items():
        path = path.replace(f"${{{key}}}", f"${{loop.out}}/${{key}}/{rel}")
    if path == SHARDS_FOLDER[0]:
        path = f"${{loop.out}}/${{key}}/{SHARDS_FOLDER[1]}"
    return path.replace("${reports}", "${reports}/${key}")


# what else a round stage reads, beside the registry's deps (dvc.yaml), and deps it does not have in a round
ROUND_EXTRA_DEPS = {
    "retrieve": ("${item}",),  # the export that curates the round
    "eval": ("${reports}/metrics/retrieve.json", "${reports}/metrics/eval.json"),  # round 1's, for the round table
}
ROUND_DROPPED_DEPS = ("${adapt.out}", "${distill.out}")  # a round evaluates its own pre-training only
