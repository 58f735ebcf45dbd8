"""The torchrun entry point of the training stages: `python -m torch.distributed.run ... -m tasks.train_worker
STAGE --params FILE` (the stages start it; see tasks/train_launch.py). One process per rank."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from dinov2_core.atomic import atomic_write_text
from tasks.params import load_params
from tasks.train_launch import die_with_parent, run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("stage", help="a training stage: its module tasks/<stage>.py defines build_spec(params)")
    parser.add_argument("--params", required=True, type=Path)
    args = parser.parse_args(argv)
    die_with_parent()  # a rank must not outlive torchrun
    params = load_params(args.params)
    try:
        spec = importlib.import_module(f"tasks.{args.stage}").build_spec(params)
        run_worker(spec, params)
    except SystemExit:
        raise
    except Exception as exc:
        failure = Path(getattr(params, args.stage).out) / "run" / "failure.txt"
        if not failure.exists():
            first = str(exc).splitlines()[0] if str(exc) else ""
            atomic_write_text(failure, f"{args.stage} (rank {os.environ.get('RANK', '0')}): "
                                       f"{type(exc).__name__}: {first}\n")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
