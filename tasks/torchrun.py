"""`python -m tasks.torchrun ARGS`: torchrun (``torch.distributed.run``, the same arguments) for the training stages,
minus its own traceback when a rank fails.

A failed rank has said why already (its one line in ``run/failure.txt``, which the stage prints; its traceback too
for a programming error). torchrun's ``ChildFailedError`` adds ~30 lines of the launcher's own stack and a box that
repeats "rank N failed"; one line is left of it: which rank ended how (a signal tells a killed rank from an error).
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def run(argv: list[str] | None = None) -> int:
    try:
        main(argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"torchrun: rank {rank} (local rank {failure.local_rank}) ended with {how}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
