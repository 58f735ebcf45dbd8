"""Backbone throughput on this machine: ``python -m benchmarks.backbone``.

Measures forward+backward images/s of
  1. ViT-S/14 at 224 px, batch 8 (dense input), per attention backend;
  2. a multi-crop student step (2 x 224 px global + 8 x 98 px local crops per image, iBOT masks on half the global
     crops) per way of running the crops: packed stream with per-size attention ("sdpa", the CPU default), packed
     stream with one block-diagonal-masked SDPA call ("packed_sdpa"), separate passes per crop size ("per-size
     loop"), xformers when available on CUDA;
and reports achieved GFLOP/s against the float32 matmul peak measured in the same run. FLOPs are the useful model
FLOPs (torch.utils.flop_counter on the meta device, forward+backward, attention per sequence), identical for all
rows of one workload. Memory: each row's activation memory, the bytes its forward keeps for the backward pass
(counted with saved-tensor hooks; weights excluded). The official implementation (facebookresearch/dinov2, from
$DINOV2_OFFICIAL_SRC or third_party/dinov2: `make official`) runs the dense rows with the same weights, alternating
with ours step by step, at batch 4 and 8; the ratios ours/official (the "ours: sdpa"
row, and with compiled blocks) are printed.
Without its source those rows are skipped with a message. Writes reports/bench/backbone.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info, measure_matmul_peak_gflops, time_fn, write_json
from dinov2_core.cost import count_saved_activations, measure_flops
from dinov2_core.layers import compile_blocks, xformers_available
from dinov2_core.models import deterministic_state_dict, vit_small

REPO = Path(__file__).resolve().parents[1]
VIT_KW = {
    "patch_size": 14,
    "img_size": 224,
    "init_values": 1e-5,
    "block_chunks": 0,
}  # ViT-S/14 as trained (224 px table)


def _loss(outs: Any) -> torch.Tensor:
    outs = outs if isinstance(outs, list) else [outs]
    return sum(o["x_norm_clstoken"].pow(2).mean() + o["x_norm_patchtokens"].pow(2).mean() for o in outs)


def _step(
    model: torch.nn.Module,
    inputs: Any,
    masks: Any,
    separate: bool = False,
    backend: str | None = None,
    packed: bool | None = None,
) -> Callable[[], None]:
    """One forward+backward; ``backend`` / ``packed`` configure our model right before the step."""

    def run() -> None:
        if backend is not None:
            model.attn_backend = backend
        if packed is not None:
            model.pack_sequences = packed
        model.zero_grad(set_to_none=True)
        if separate:  # one pass per crop size (what the reference does without xformers)
            loss = sum(_loss(model.forward_features(x, m)) for x, m in zip(inputs, masks))
        else:
            loss = _loss(model.forward_features(inputs, masks))
        loss.backward()

    return run


def _interleaved(
    variants: list[tuple[str, Callable[[], None]]], iters: int, warmup: int, device: str
) -> dict[str, list[float]]:
    """Round-robin timing (A B C A B C ...): on a shared machine every variant sees the same load."""
    for _ in range(warmup):
        for _, fn in variants:
            fn()
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(iters):
        for name, fn in variants:
            times[name] += time_fn(fn, warmup=0, iters=1, device=device)
    return times


def _saved_mb(variants: list[tuple[str, Callable[[], None]]], params: list[torch.Tensor]) -> dict[str, float]:
    """Activation memory of each variant: what its forward keeps for the backward pass (one extra step each)."""
    return {name: count_saved_activations(fn, params).total_bytes / 2**20 for name, fn in variants}


def _meta_flops(inputs: Any, masks: Any) -> int:
    with torch.device("meta"):
        m = vit_small(**VIT_KW)
    to_meta = lambda t: None if t is None else torch.empty_like(t, device="meta")
    if isinstance(inputs, list):
        return measure_flops(
            m, [to_meta(x) for x in inputs], backward=True, masks=[to_meta(k) for k in masks]
        )
    return measure_flops(m, to_meta(inputs), backward=True, masks=to_meta(masks))


OFFICIAL_DIR = REPO / "third_party" / "dinov2"  # git-ignored; `make official` clones it
OFFICIAL_HINT = f"set DINOV2_OFFICIAL_SRC or run `make official` to clone it into {OFFICIAL_DIR.relative_to(REPO)}"
OFFICIAL_DENSE = "official ViT-S/14 (facebookresearch/dinov2)"


def official_source() -> str | None:
    """Where the official implementation's source is: $DINOV2_OFFICIAL_SRC, else third_party/dinov2 if cloned."""
    src = os.environ.get("DINOV2_OFFICIAL_SRC")
    if src:
        return src
    return str(OFFICIAL_DIR) if (OFFICIAL_DIR / "dinov2" / "models").is_dir() else None


def _load_official(src: str):
    if not torch.cuda.is_available():
        os.environ.setdefault("XFORMERS_DISABLED", "1")
    sys.path.insert(0, os.path.abspath(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from dinov2.models import vision_transformer as ref_vits  # type: ignore
    return ref_vits


def _row(
    name: str, workload: str, images: int, times: list[float], flops: int, peak: float
) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        "workload": workload,
        "variant": name,
        "images_per_step": images,
        "median_step_s": med,
        "min_step_s": min(times),
        "timed_steps": len(times),
        "images_per_s": images / med,
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / med / 1e9,
        "fraction_of_peak": flops / med / 1e9 / peak,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8], help="batch sizes of the dense 224 px rows")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compiled-blocks rows")
    ap.add_argument("--mc-batch", type=int, default=2, help="images per multi-crop step")
    ap.add_argument("--local-crops", type=int, default=8)
    ap.add_argument("--iters", type=int, default=8, help="timed steps per row (alternating with the others)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "reports" / "bench" / "backbone.json"))
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    torch.manual_seed(0)
    official_src = official_source()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = measure_matmul_peak_gflops(device=device)

    ours = vit_small(**VIT_KW)
    sd = deterministic_state_dict(ours, 0)
    ours.load_state_dict(sd)
    ours.to(device).train()
    compiled = None
    if args.compile:  # the same weights, every block torch.compiled (runtime.compile in the training stages)
        compiled = copy.deepcopy(ours)
        compiled.attn_backend = "sdpa"
        compile_blocks(compiled)
    ref_model = None
    if official_src:
        ref_vits = _load_official(official_src)
        ref_model = ref_vits.vit_small(**VIT_KW)
        ref_model.load_state_dict(sd, strict=True)
        ref_model.to(device).train()
    else:
        print(f"official implementation not found ({OFFICIAL_HINT}): no ratio against it in this run")

    rows: list[dict[str, Any]] = []
    backends = ["sdpa", "eager"] + (["xformers"] if device == "cuda" and xformers_available() else [])
    params = [*ours.parameters(), *(ref_model.parameters() if ref_model is not None else [])]

    # 1. dense ViT-S/14 @ 224, ours next to the official model, alternating, at each batch size
    for batch in args.batches:
        wl = f"ViT-S/14 224px x{batch}"
        x = torch.randn(batch, 3, 224, 224, device=device)
        variants: list[tuple[str, Callable[[], None]]] = []
        for b in backends if batch == max(args.batches) else ["sdpa"]:
            variants.append((f"ours: {b}", _step(ours, x, None, backend=b)))
        if compiled is not None:
            variants.append(("ours: sdpa, compiled blocks", _step(compiled, x, None)))
        if ref_model is not None:
            variants.append((OFFICIAL_DENSE, _step(ref_model, x, None)))
        flops = _meta_flops(x, None)
        saved = _saved_mb([v for v in variants if "compiled" not in v[0]], params)
        for name, times in _interleaved(variants, args.iters, args.warmup, device).items():
            rows.append({**_row(name, wl, batch, times, flops, peak), "saved_activation_mb": saved.get(name)})

    # 2. multi-crop student step
    nb, nl = args.mc_batch, args.local_crops
    wl = f"multi-crop 2x224+{nl}x98 x{nb} img"
    g = torch.randn(2 * nb, 3, 224, 224, device=device)
    l = torch.randn(nl * nb, 3, 98, 98, device=device)
    masks = torch.zeros(2 * nb, 256, dtype=torch.bool, device=device)
    masks[::2, :77] = True  # half the global crops masked at ~30%
    inputs, mlist = [g, l], [masks, None]
    variants = [
        ("ours: packed, per-size attention (sdpa)", _step(ours, inputs, mlist, backend="sdpa", packed=True)),
        (
            "ours: packed, block-diagonal masked SDPA",
            _step(ours, inputs, mlist, backend="packed_sdpa", packed=True),
        ),
        ("ours: per-size loop (separate passes)", _step(ours, inputs, mlist, backend="sdpa", packed=False)),
    ]
    if device == "cuda" and xformers_available():
        variants.append(
            (
                "ours: packed, xformers BlockDiagonalMask",
                _step(ours, inputs, mlist, backend="xformers", packed=True),
            )
        )
    if ref_model is not None:
        variants.append(
            ("official: per-size loop", _step(ref_model, inputs, mlist, separate=True))
        )
    flops = _meta_flops(inputs, mlist)
    saved = _saved_mb(variants, params)
    for name, times in _interleaved(variants, args.iters, args.warmup, device).items():
        rows.append({**_row(name, wl, nb, times, flops, peak), "saved_activation_mb": saved[name]})
    ours.pack_sequences = True

    peak_end = measure_matmul_peak_gflops(
        device=device
    )  # shared machine: keep the better of two measurements
    peak = max(peak, peak_end)
    for r in rows:
        r["fraction_of_peak"] = r["achieved_gflops"] / peak

    ratios: dict[str, float] = {}
    if ref_model is not None:
        by = {(r["workload"], r["variant"]): r for r in rows}
        for batch in args.batches:
            dense = f"ViT-S/14 224px x{batch}"
            for ours_row, key in (("ours: sdpa", "sdpa"), ("ours: sdpa, compiled blocks", "sdpa, compiled blocks")):
                if (dense, ours_row) in by:
                    ratios[f"{key} x{batch}"] = (
                        by[(dense, ours_row)]["images_per_s"] / by[(dense, OFFICIAL_DENSE)]["images_per_s"]
                    )

    result = {
        "benchmark": "backbone",
        "device": device,
        "machine": machine_info(),
        "matmul_peak_gflops_fp32": peak,
        "official_src": official_src,
        "official_ratio_ours_over_reference_dense": ratios or None,
        "rows": rows,
        "runtime_s": time.perf_counter() - t_start,
    }
    write_json(Path(args.out), result)
    _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for r in result["rows"]:
            print(r)
        return
    t = Table(
        title=f"Backbone fwd+bwd on {result['device']} ({result['machine']['threads']} threads), "
        f"fp32 matmul peak {result['matmul_peak_gflops_fp32']:.1f} GFLOP/s"
    )
    for col in ("workload", "variant", "img/s", "s/step", "GFLOP/step", "GFLOP/s", "% peak", "activations MB"):
        t.add_column(col, justify="left" if col in ("workload", "variant") else "right")
    for r in result["rows"]:
        t.add_row(
            r["workload"],
            r["variant"],
            f"{r['images_per_s']:.2f}",
            f"{r['median_step_s']:.2f}",
            f"{r['gflop_per_step']:.0f}",
            f"{r['achieved_gflops']:.1f}",
            f"{100 * r['fraction_of_peak']:.0f}%",
            "-" if r["saved_activation_mb"] is None else f"{r['saved_activation_mb']:.0f}",
        )
    c = Console(width=150)
    c.print(t)
    for key, ratio in (result["official_ratio_ours_over_reference_dense"] or {}).items():
        c.print(f"ours ({key}) / official, dense ViT-S/14 fwd+bwd, median of alternating steps: {ratio:.3f}x")
    c.print(f"total runtime {result['runtime_s']:.0f} s")


if __name__ == "__main__":
    main()
