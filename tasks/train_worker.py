"""The torchrun entry point of the training stages: `python -m tasks.torchrun ... -m tasks.train_worker
STAGE --params FILE` (the stages start it; see tasks/train_launch.py). One process per rank."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from pathlib import Path

import torch.distributed
from torch.distributed.checkpoint.api import CheckpointException

from dinov2_core.atomic import atomic_write_text
from dinov2_core.train.checkpoint import checkpoint_failure
from tasks.params import load_params
from tasks.train_launch import TRANSIENT_MARK, die_with_parent, run_worker


def _lost_peer(exc: BaseException) -> bool:
    """A collective failed because another rank or node went away: torch's distributed errors (NCCL, store,
    timeouts), and gloo's transport errors, which reach Python as a plain RuntimeError naming its transport
    ("Connection closed by peer", measured with a killed node)."""
    return isinstance(exc, torch.distributed.DistError) or (
        isinstance(exc, RuntimeError) and "gloo/transport" in str(exc))


def _out_of_memory(exc: BaseException) -> bool:
    """The GPU's (torch.OutOfMemoryError) or the CPU allocator's ("DefaultCPUAllocator: can't allocate memory")."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))


def failure_line(stage: str, params, exc: BaseException) -> tuple[str, bool]:
    """The one line a failed rank leaves for the stage (without the stage/rank prefix), and whether a retry may help
    (a lost peer). Out of memory says what to change: the batch per process, or activation checkpointing."""
    exc = checkpoint_failure(exc)  # DCP's CheckpointException: the failing rank's own exception
    first = str(exc).splitlines()[0] if str(exc) else ""
    lost_peer = _lost_peer(exc)
    if lost_peer:  # gloo: "[/path/pair.cc:545] Read error [addr]: Connection reset by peer. This is ..."
        first = "lost a peer: " + re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]
    elif _out_of_memory(exc):  # CPU: "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: ..."
        launch = params.launch
        per_process = -(-getattr(params, stage).data.global_batch_size // (launch.nnodes * launch.nproc_per_node))
        what = re.sub(r"^\[[^\]]*\]\s*(err == 0\.\s*)?", "", first)[:160]
        first = (f"out of memory with {per_process} images per process: lower {stage}.data.global_batch_size"
                 + ("" if launch.activation_checkpointing else " or set launch.activation_checkpointing=true")
                 + f" (`dinov2-pipeline cost` estimates the memory per GPU); {what}")
    return f"{type(exc).__name__}: {first}", lost_peer


# What a rank reports in one line, as the CLI does for a stage (DINOV2_DEBUG=1 for the traceback): bad data or
# params, storage, the network, out of memory, a lost peer. Anything else is a bug and keeps its traceback.
CONDITIONS = (ValueError, RuntimeError, OSError)


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
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        failure = Path(getattr(params, args.stage).out) / "run" / "failure.txt"
        line, lost_peer = failure_line(args.stage, params, exc)
        if not failure.exists():
            atomic_write_text(failure, f"{args.stage} (rank {os.environ.get('RANK', '0')}): {line}\n"
                                       + (f"{TRANSIENT_MARK}\n" if lost_peer else ""))
        if isinstance(checkpoint_failure(exc), CONDITIONS) and not os.environ.get("DINOV2_DEBUG"):
            print(f"rank {os.environ.get('RANK', '0')}: {line}", file=sys.stderr)
            return 1
        raise
    return 0


def leave(code: int) -> None:
    """End a rank that finished its work (outputs written, process group destroyed) without the interpreter's
    teardown: torch's C++ threads can abort it there (SIGABRT, "terminate called without an active exception", once
    in CI on a two-node run), and torchrun would then fail a stage whose work was done."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    leave(main())  # a rank failing on a bug raises out of main() instead: the interpreter prints its traceback
