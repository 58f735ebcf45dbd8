"""Copy detection (dedup) and decontamination quality on real photos the defaults were not chosen on.

    python -m benchmarks.copy_detection [--seed 0] [--out reports/bench/copy_detection.json]

Two groups of real photos from different sources (see :mod:`benchmarks.copy_detection_corpora`):
"calibration" (scikit-image, scikit-learn, matplotlib, PyWavelets, Debian mate-backgrounds) and "held_out"
(Debian plasma-workspace-wallpapers photographs, opencv-doc samples). Distinct items are non-overlapping
tiles of each photo (same-photo tiles are the hard negatives); copies are web re-uploads (resize, JPEG
q20-60, <= 5 % crop per side, mirror, brightness). For each group, with the pipeline's default dedup params
(params.yaml `dedup`): pairwise recall / precision of the dedup components, for the descriptor
alone and for the two-stage graph (descriptor candidates + local-feature verification), and the cost per
image. The verifier's thresholds are swept on the calibration group only; the held-out row is what they
give on images nothing was tuned on. Decontamination: a third of each group's items play the eval set,
copies of them are planted in the pool, and the default decontamination params must remove every one
while removing few clean images. The default demo data's figures come from ``benchmarks.curation``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.copy_detection_corpora import PHOTO_GROUPS, build_photo_bench, pairwise_scores, web_copy
from dinov2_core.curation import PairVerifier, copy_detection_descriptor, copy_detection_views, deduplicate
from dinov2_core.curation.components import connected_components, knn_edges
from dinov2_core.curation.decontaminate import decontaminate
from dinov2_core.curation.dedup import view_edges
from dinov2_core.curation.knn import knn_search
from tasks.params import default_params
from tasks.stages import DecontaminateParams, DedupParams

OUT = Path("reports/bench/copy_detection.json")


def _dedup(bench, emb, views, p: DedupParams, verify: bool) -> dict:
    verifier = PairVerifier(
        lambda i: bench.images[i],
        min_inliers=p.verify_min_inliers,
        min_ncc=p.verify_min_ncc,
        min_dense=p.verify_min_dense,
    )
    start = time.perf_counter()
    df, m = deduplicate(
        emb,
        [str(i) for i in range(len(bench))],
        threshold=p.threshold,
        k=p.k,
        views=views if p.crop_views else None,
        verifier=verifier if verify else None,
        verify_k=p.verify_k,
    )
    seconds = time.perf_counter() - start
    return {
        **{
            k: round(v, 4) if isinstance(v, float) else v
            for k, v in pairwise_scores(df["component"].to_numpy(), bench.source).items()
        },
        "graph_ms_per_image": round(1000 * seconds / len(bench), 2),
        **{k: m[k] for k in ("n_candidate_pairs", "n_verified_pairs", "n_verified_copies") if k in m},
        **({"n_dense_copies": verifier.n_dense_copies} if verify else {}),
    }


def sweep_verifier(bench, emb, views, p: DedupParams) -> dict:
    """Recall / precision for a grid of (min inliers, min aligned correlation, min dense score), the descriptor
    threshold fixed at its default: features are measured once per candidate pair, the grid only re-decides."""
    n = len(bench)
    knn = knn_search(emb, k=min(p.k, n - 1))
    s1, d1, m1 = knn_edges(knn.sims[:, : p.verify_k + 1], knn.ids[:, : p.verify_k + 1], -np.inf)
    s2, d2, m2 = knn_edges(knn.sims, knn.ids, p.threshold)
    s3, d3, m3, _ = view_edges(emb, views, p.threshold)
    src, dst, sim = np.concatenate([s1, s2, s3]), np.concatenate([d1, d2, d3]), np.concatenate([m1, m2, m3])
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    order = np.lexsort((-sim, lo * n + hi))  # the strongest similarity of each pair first
    lo, hi, sim = lo[order], hi[order], sim[order]
    _, idx = np.unique(lo * n + hi, return_index=True)
    lo, hi, sim = lo[idx], hi[idx], sim[idx]
    verifier = PairVerifier(lambda i: bench.images[i], min_inliers=1, min_ncc=-1.0)
    ok, inliers, ncc = verifier.measure(lo, hi)
    _, dense = verifier.measure_dense(lo, hi)
    truth = bench.source[lo] == bench.source[hi]
    rows = []
    for mi, mn, md in itertools.product((3, 4, 6, 8, 12), (0.6, 0.7, 0.8, 0.9), (None, 0.8, 0.85, 0.9, 0.95)):
        keep = (ok & (inliers >= mi) & (ncc >= mn)) | (sim > np.float32(p.threshold))
        if md is not None:
            keep |= dense >= md
        sc = pairwise_scores(connected_components(n, lo[keep], hi[keep]), bench.source)
        rows.append(
            {
                "min_inliers": mi,
                "min_ncc": mn,
                "min_dense": md,
                "recall": round(sc["recall"], 4),
                "precision": round(sc["precision"], 4),
            }
        )
    # the dense check's separation: its highest score on a candidate pair that is not a copy, and copies' scores
    separation = {
        "highest_non_copy": round(float(dense[~truth].max(initial=0.0)), 4),
        "copy_quantiles_5_25_50": [round(float(q), 4) for q in np.quantile(dense[truth], [0.05, 0.25, 0.5])],
    }
    return {"grid": rows, "dense_separation": separation}


def decontamination(bench, p: DecontaminateParams, d: DedupParams, seed: int) -> dict:
    """Every third distinct item is an eval image; a web copy of each is planted in the pool, whose other
    members are the remaining items and their copies. Default params, whole dedup components removed."""
    rng = np.random.default_rng(seed)
    distinct = np.flatnonzero(~bench.is_copy)
    eval_idx = distinct[::3]
    in_pool = ~np.isin(bench.source, eval_idx)
    pool_imgs = [im for im, keep in zip(bench.images, in_pool) if keep]
    planted = [web_copy(bench.images[i], rng)[0] for i in eval_idx]
    pool_imgs += planted
    is_planted = np.r_[np.zeros(int(in_pool.sum()), bool), np.ones(len(planted), bool)]
    evals = [bench.images[i] for i in eval_idx]
    start = time.perf_counter()
    pool = copy_detection_descriptor(pool_imgs)
    keys = [str(i) for i in range(len(pool_imgs))]
    both = pool_imgs + evals  # the verifier's index space: pool images, then eval images
    verifier = PairVerifier(
        lambda i: both[i], min_inliers=d.verify_min_inliers, min_ncc=d.verify_min_ncc, min_dense=d.verify_min_dense
    )
    comps = (
        deduplicate(
            pool,
            keys,
            threshold=d.threshold,
            k=d.k,
            verifier=verifier if d.verify else None,
            verify_k=d.verify_k,
            views=copy_detection_views(pool_imgs) if d.crop_views else None,
        )
        .frame["component"]
        .to_numpy()
    )
    df, decontam_metrics = decontaminate(
        pool,
        keys,
        copy_detection_descriptor(evals),
        threshold=p.threshold,
        k=p.k,
        components=comps,
        eval_views=copy_detection_views(evals) if p.crop_views else None,
        verifier=verifier if p.verify else None,
        verify_k=d.verify_k,
    )
    seconds = time.perf_counter() - start
    removed = df["removed"].to_numpy()
    return {
        "eval_images": len(evals),
        "pool_images": len(pool_imgs),
        "planted_copies": int(is_planted.sum()),
        "planted_removed": int(removed[is_planted].sum()),
        "recall": round(float(removed[is_planted].mean()), 4),
        "clean_removed": int(removed[~is_planted].sum()),
        "clean_removed_fraction": round(float(removed[~is_planted].mean()), 4),
        "removed_by_verification": int(decontam_metrics.get("n_added_by_verification", 0)),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sweep", action="store_true", help="skip the calibration-group threshold sweep")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv if argv is not None else [])
    dp, cp = default_params().dedup, default_params().decontaminate
    results: dict = {
        "dedup_params": {
            k: getattr(dp, k)
            for k in (
                "threshold",
                "k",
                "crop_views",
                "verify",
                "verify_k",
                "verify_min_inliers",
                "verify_min_ncc",
                "verify_min_dense",
            )
        },
        "decontaminate_threshold": cp.threshold,
        "seed": args.seed,
        "groups": {},
    }
    for group in PHOTO_GROUPS:
        bench = build_photo_bench(group, seed=args.seed)
        start = time.perf_counter()
        emb = copy_detection_descriptor(bench.images)
        views = copy_detection_views(bench.images)
        embed_ms = 1000 * (time.perf_counter() - start) / len(bench)
        row = {
            "corpus": bench.summary(),
            "embed_ms_per_image": round(embed_ms, 2),
            "descriptor_only": _dedup(bench, emb, views, dp, verify=False),
            "default": _dedup(bench, emb, views, dp, verify=True),
            "decontamination": decontamination(bench, cp, dp, args.seed),
        }
        if group == "calibration" and not args.no_sweep:
            row["verifier_sweep"] = sweep_verifier(bench, emb, views, dp)
        results["groups"][group] = row

    print(f"{'group':<12}{'graph':<17}{'recall':>8}{'precision':>11}{'false pairs':>13}{'ms/img':>9}")
    for group, row in results["groups"].items():
        for name in ("descriptor_only", "default"):
            r = row[name]
            ms = row["embed_ms_per_image"] + r["graph_ms_per_image"]
            print(
                f"{group:<12}{name:<17}{r['recall']:>8.3f}{r['precision']:>11.3f}{r['false_pairs']:>13}{ms:>9.1f}"
            )
    for group, row in results["groups"].items():
        dc = row["decontamination"]
        print(
            f"decontamination {group}: planted eval copies removed {dc['planted_removed']}/{dc['planted_copies']}"
            f", clean images removed {dc['clean_removed']}/{dc['pool_images'] - dc['planted_copies']}"
            f" ({100 * dc['clean_removed_fraction']:.1f} %)"
        )
    print("default demo data: see benchmarks.curation (quality.dedup / quality.decontaminate)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(results, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    )
    return results


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
