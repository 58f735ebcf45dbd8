"""Where the training input pipeline spends its CPU: ``python -m benchmarks.loader`` (part of ``make bench``).

At the GPU quality run's configuration (512 Fashion-MNIST images a step from WebDataset shards, 2 global crops of
56 px + 6 local of 28 px, iBOT masks), side by side in one run:
  * a loader worker's seconds per batch (one process, one thread), rendering the crops itself (what it does without a
    GPU) and handing over the crops' plan only (on a GPU the crops are rendered there: ``augment_device``);
  * the training process's CPU seconds per batch it receives from 2 worker processes (masks are drawn in the
    workers; the parts are concatenated here), with the workers' queue full, so none of it is waiting.
Writes reports/bench/loader.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_info, write_json

REPO = Path(__file__).resolve().parents[1]


def _transform():
    from dinov2_core.data.batch_augment import BatchMultiCrop

    # the quality profile's crops (params.quality.yaml over params.yaml)
    return BatchMultiCrop(global_crops_size=56, local_crops_size=28, local_crops_number=6, blur_probs=(0.0, 0.0, 0.0),
                          solarize_prob=0.0, local_crops_scale=(0.2, 0.5))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "reports" / "bench" / "loader.json"))
    if argv is None:
        argv = sys.argv[1:] if __name__ == "__main__" else []
    args = parser.parse_args(argv)

    from dinov2_core.data.loader import SSLDataLoader, read_shard_index
    from tests.train._shards import fashion_items, png_bytes, write_shards

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    result: dict[str, Any] = {"machine": machine_info(), "batch": args.batch, "crops": "2 x 56 px + 6 x 28 px"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            images, _ = fashion_items(8 * args.batch, "train")
            index = read_shard_index(str(write_shards(Path(tmp) / "shards", [png_bytes(a) for a in images],
                                                      args.batch)))

            def loader(workers: int, device: str | None) -> SSLDataLoader:
                return SSLDataLoader(index, _transform(), global_batch_size=args.batch, streams=4, patch_size=14,
                                     global_crops_size=56, num_workers=workers, augment_device=device)

            for name, device in (("worker_s_render_in_worker", None), ("worker_s_plan_only", "cpu")):
                parts = iter(loader(0, device).dataset)
                next(parts)  # the first batch opens every stream's first shard
                start = time.perf_counter()
                for _ in range(args.batches):
                    next(parts)
                result[name] = (time.perf_counter() - start) / args.batches
            batches = iter(loader(2, None))
            next(batches)
            time.sleep(4 * result["worker_s_render_in_worker"] * 2)  # both workers' prefetch queues fill up
            start = time.process_time()
            for _ in range(2):  # within the prefetched batches: no waiting counted
                next(batches)
            result["training_process_cpu_s_per_batch"] = (time.process_time() - start) / 2
            del batches
    finally:
        torch.set_num_threads(threads)
    result["worker_speedup_plan_only"] = result["worker_s_render_in_worker"] / result["worker_s_plan_only"]
    print(f"per batch of {args.batch}: worker {result['worker_s_render_in_worker']:.3f} s rendering the crops, "
          f"{result['worker_s_plan_only']:.3f} s planning them only ({result['worker_speedup_plan_only']:.2f}x); "
          f"training process {result['training_process_cpu_s_per_batch']:.3f} s CPU")
    write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
