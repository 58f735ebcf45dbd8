"""Curation quality measured against the demo data's ground-truth sidecar (metrics only, never decisions).

Each kept image of the ingest store is traced back to its crawl row and from there to a *true identity*:
an original crawl item, or the evaluation image it copies. Near-duplicates share their original's identity,
so dedup precision/recall, decontamination recall and the retrieved in-domain share follow directly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

IN_DOMAIN_KINDS = {"in_domain"}


def load_truth(ground_truth: str | Path | None, store_manifest: pd.DataFrame) -> pd.DataFrame | None:
    """Per sha256: kind, identity, in_domain, eval_id; None when there is no sidecar (a real crawl)."""
    if not ground_truth or not Path(ground_truth).exists():
        return None
    gt = pd.read_parquet(ground_truth).set_index("row")
    first_row_of_url = gt.reset_index().drop_duplicates("url").set_index("url")["row"]

    def identity(row: int) -> str:
        rec = gt.loc[row]
        if rec["kind"] == "eval_copy":
            return f"eval:{rec['original']}"
        if rec["kind"] in ("near_duplicate", "exact_duplicate") and rec["original"] in first_row_of_url.index:
            return f"crawl:{rec['original']}"
        return f"crawl:{rec['url']}"

    rows = store_manifest["row"].astype(int).tolist()
    truth = pd.DataFrame({
        "sha256": store_manifest["sha256"].tolist(),
        "kind": [gt.at[r, "kind"] for r in rows],
        "identity": [identity(r) for r in rows],
        # an in-domain item's duplicates are in-domain too
        "in_domain": [gt.at[r, "kind"] in IN_DOMAIN_KINDS or (
            gt.at[r, "kind"] in ("near_duplicate", "exact_duplicate") and int(gt.at[r, "label"]) >= 0)
            for r in rows],
        "eval_id": [gt.at[r, "original"] if gt.at[r, "kind"] == "eval_copy" else None for r in rows],
    })
    return truth.set_index("sha256")


def dedup_quality(dedup: pd.DataFrame, truth: pd.DataFrame,
                  pixel_ncc: Callable[[str, str], float] | None = None) -> dict:
    """Recall: planted near-duplicate pairs that ended in one component. Precision: removals whose kept
    representative is truly the same image (a wrong merge removes a distinct image). With ``pixel_ncc(removed key,
    kept key)``, the wrong merges are split like decontamination's: those whose pixels nearly equal their
    representative are the crawl's own duplicates that the sidecar does not know (Fashion-MNIST holds the same
    product photo under several items), the rest are look-alikes lost."""
    d = dedup.set_index("key")
    ident = truth["identity"].reindex(d.index)
    comp = d["component"]
    # pairs (copy, its original) with both in the pool; eval copies pair with other copies of the same eval image
    planted = truth[truth["kind"] == "near_duplicate"]
    first_of_identity = truth[truth["kind"] != "near_duplicate"].reset_index().drop_duplicates("identity")
    orig_key = first_of_identity.set_index("identity")["sha256"]
    pairs = [(k, orig_key[i]) for k, i in planted["identity"].items() if i in orig_key.index and k in d.index]
    same = sum(int(comp[a] == comp[b]) for a, b in pairs)
    removed = d[~d["kept"]]
    wrong_pairs = [(k, r) for k, r in removed["duplicate_of"].items() if ident[k] != ident[r]]
    correct = len(removed) - len(wrong_pairs)
    out = {
        "planted_pairs": len(pairs),
        "planted_pairs_merged": same,
        "recall": round(same / len(pairs), 4) if pairs else None,
        "removed": len(removed),
        "removed_correctly": int(correct),
        "distinct_images_wrongly_removed": len(wrong_pairs),
        "precision": round(correct / len(removed), 4) if len(removed) else None,
    }
    if pixel_ncc is not None:
        near = sum(int(pixel_ncc(k, r) >= PIXEL_COPY_NCC) for k, r in wrong_pairs)
        out["wrongly_removed_pixel_near_copies"] = near
        out["precision_pixel_copies_counted"] = round((correct + near) / len(removed), 4) if len(removed) else None
    return out


# Grey pixels at 32 px correlating this much: the same picture. Distinct Fashion-MNIST items rarely get there (eval
# test items: 0.7 % of 150 had another of 600 at >= 0.98, 14.7 % at >= 0.95; random pairs of crawl items: 0 of 500).
PIXEL_COPY_NCC = 0.98


def grey_pixel_ncc(a: Image.Image, b: Image.Image, side: int = 32) -> float:
    """Correlation of two images' grey pixels at ``side`` x ``side``."""
    x, y = (np.asarray(im.convert("L").resize((side, side), Image.Resampling.BILINEAR), np.float64) for im in (a, b))
    x, y = x - x.mean(), y - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else 1.0


def decontamination_quality(result: pd.DataFrame, truth: pd.DataFrame,
                            pixel_ncc: Callable[[str, str], float] | None = None) -> dict:
    """Every planted copy of an evaluation image must be gone; clean images removed are the price paid. With
    ``pixel_ncc(pool key, eval id)``, the clean images removed are split into those whose pixels nearly equal their
    matched eval image (a dataset's own train/test near-duplicates: removing them is decontamination too) and the
    rest (distinct images lost)."""
    r = result.set_index("key")
    kinds = truth["kind"].reindex(r.index)
    copies = r[kinds == "eval_copy"]
    clean = r[kinds != "eval_copy"]
    out = {
        "planted_eval_copies_in_pool": len(copies),
        "planted_eval_copies_removed": int(copies["removed"].sum()),
        "recall": round(float(copies["removed"].mean()), 4) if len(copies) else None,
        "clean_images_removed": int(clean["removed"].sum()),
        "clean_removed_fraction": round(float(clean["removed"].mean()), 4) if len(clean) else None,
    }
    if pixel_ncc is not None and len(clean):
        removed = clean[clean["removed"]]
        near = sum(int(pixel_ncc(k, e) >= PIXEL_COPY_NCC) for k, e in removed["matched_eval_id"].items())
        out["clean_removed_pixel_near_copies"] = near
        out["clean_removed_distinct_fraction"] = round((len(removed) - near) / len(clean), 4)
    return out


def retrieval_quality(pool_keys: list[str], curated_keys: list[str], truth: pd.DataFrame) -> dict:
    """Share of in-domain images before and after retrieval (LVD-142M's point: curation raises it)."""
    pool = truth["in_domain"].reindex(pool_keys).fillna(False)
    cur = truth["in_domain"].reindex(curated_keys).fillna(False)
    in_pool = int(pool.sum())
    return {
        "pool_in_domain_share": round(float(pool.mean()), 4) if len(pool) else None,
        "curated_in_domain_share": round(float(cur.mean()), 4) if len(cur) else None,
        "in_domain_recall": round(float(cur.sum()) / in_pool, 4) if in_pool else None,
        # what the off-domain part of the curated set is made of (the demo crawl's kinds)
        "curated_off_domain_by_kind": {k: int(v) for k, v in truth["kind"].reindex(curated_keys)[~cur.to_numpy()]
                                       .value_counts().items()},
    }
