"""Shared benchmark utilities: the machine's measured matmul peak and simple wall-clock timing."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def measure_matmul_peak_gflops(
    dtype: torch.dtype = torch.float32,
    sizes: Sequence[int] = (512, 1024, 2048),
    min_seconds: float = 0.4,
    device: str = "cpu",
) -> float:
    """Best sustained GFLOP/s of square matmuls (2 n^3 FLOPs each) over ``sizes``: the practical peak that model
    throughput is compared against, measured on this machine in the same run."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        c = torch.empty(n, n, dtype=dtype, device=device)
        torch.mm(a, b, out=c)  # warm-up (thread pool, caches)
        _sync(device)
        iters, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=c)
            iters += 1
            _sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds and iters >= 2:
                break
        best = max(best, 2.0 * n**3 * iters / elapsed / 1e9)
    return best


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], Any],
    warmup: int = 1,
    iters: int = 3,
    max_seconds: float | None = None,
    device: str = "cpu",
) -> list[float]:
    """Seconds per call for ``iters`` calls after ``warmup`` untimed ones (stops early past ``max_seconds``,
    keeping at least one timed call)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return times


def summarize_times(times: Sequence[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def machine_info() -> dict[str, Any]:
    import platform

    return {
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.is_available(),
    }


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
