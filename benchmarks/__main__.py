"""`python -m benchmarks` (what `make bench` runs): every benchmark module in turn, each writing reports/bench/."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import benchmarks

SKIP = {"common", "copy_detection_corpora", "device_bundle", "device_rehearsal", "__main__"}  # tools, not benchmarks
LONG = {"recipe_sweep": "trains every row of the pretraining sweep (~35 min): `make sweep`",
        "curation_loop": "runs both rounds of the curation loop in a fresh project (~25 min): "
                         "`python -m benchmarks.curation_loop`"}


def main(argv: list[str]) -> int:
    names = argv or sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name not in SKIP | set(LONG))
    if not argv:
        for name, why in LONG.items():
            print(f"benchmarks.{name} skipped: {why}", flush=True)
    failed = []
    for name in names:
        print(f"\n=== benchmarks.{name} ===", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        try:
            module.main()
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            failed.append(name)
            print(f"benchmarks.{name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"=== benchmarks.{name}: {time.perf_counter() - start:.0f} s ===", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
