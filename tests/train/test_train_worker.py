"""The one line a failed training rank leaves for its stage (tasks/train_worker.py): out of memory says what to
change, a lost peer is marked worth a retry, anything else keeps its own first line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.params import load_params
from tasks.train_worker import failure_line

ROOT = Path(__file__).resolve().parents[2]


def _cpu_allocator_failure() -> RuntimeError:
    try:  # the real allocator's refusal, as a batch too big for the machine gets it
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as exc:
        return exc
    pytest.fail("allocating 4 EiB succeeded")


def test_out_of_memory_names_the_batch_per_process_and_what_to_change():
    params = load_params(ROOT / "params.yaml")
    line, transient = failure_line("pretrain", params, _cpu_allocator_failure())
    assert not transient and "\n" not in line and len(line) < 400
    assert line.startswith("RuntimeError: out of memory with 64 images per process: lower "
                           "pretrain.data.global_batch_size or set launch.activation_checkpointing=true"), line
    assert "DefaultCPUAllocator: can't allocate memory" in line and "enforce fail" not in line

    # on GPUs (torch.OutOfMemoryError), 2 processes share the batch; with checkpointing on only the batch is left
    two = load_params(ROOT / "params.yaml", ["launch.nproc_per_node=2", "launch.activation_checkpointing=true"])
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                  "79.15 GiB of which 1.2 GiB is free.\nIncluding non-PyTorch memory ...")
    line, transient = failure_line("adapt", two, cuda)
    assert not transient and "\n" not in line
    assert line.startswith("OutOfMemoryError: out of memory with 16 images per process: lower "
                           "adapt.data.global_batch_size (`dinov2-pipeline cost`"), line
    assert "activation_checkpointing" not in line and "Tried to allocate 2.00 GiB" in line


def test_a_lost_peer_is_transient_and_other_errors_keep_their_first_line():
    params = load_params(ROOT / "params.yaml")
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:38420: "
                        "Connection reset by peer. This may indicate a possible application crash on rank 0")
    line, transient = failure_line("pretrain", params, gloo)
    assert transient and line == "RuntimeError: lost a peer: Read error [127.0.0.1]:38420: Connection reset by peer"
    line, transient = failure_line("distill", params, ValueError("bad shard index\nmore"))
    assert not transient and line == "ValueError: bad shard index"

    # DCP's CheckpointException (a BaseException): the failing rank's own exception, e.g. a full disk while saving
    from torch.distributed.checkpoint.api import CheckpointException

    full = CheckpointException("save", {1: (OSError(28, "No space left on device"), None),
                                        0: (OSError(28, "No space left on device"), None)})
    line, transient = failure_line("pretrain", params, full)
    assert not transient and line == "OSError: [Errno 28] No space left on device"


@pytest.mark.slow
def test_a_stage_out_of_memory_fails_with_that_line(train_params, fmnist_shards, tmp_path, capfd):
    """A model too big for the machine (a head of 2^40 prototypes: the allocator refuses it at once) fails the stage
    with the one line, through torchrun and the stage's TrainingFailed, not as a rank's traceback."""
    from tasks.pretrain import run_pretrain
    from tasks.train_launch import TrainingFailed

    p = train_params("pretrain", fmnist_shards, steps=1, batch=8,
                     extra=[f"pretrain.loss.dino_head.n_prototypes={2**40}"])
    with pytest.raises(TrainingFailed) as err:
        run_pretrain(p)
    msg = str(err.value)
    assert "\n" not in msg and not getattr(err.value, "transient", False)
    assert msg.startswith("pretrain (rank 0): RuntimeError: out of memory with 8 images per process: lower "
                          "pretrain.data.global_batch_size or set launch.activation_checkpointing=true"), msg
    # the workers' output (the stage's stderr) says it once per rank and once for torchrun, with no traceback
    err = capfd.readouterr().err
    assert "Traceback" not in err and "rank 0: RuntimeError: out of memory with 8 images" in err, err[-3000:]
    assert "torchrun: rank 0 (local rank 0) ended with exit code 1" in err, err[-3000:]
