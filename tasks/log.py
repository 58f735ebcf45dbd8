"""The project's one logger. Stages log through it; Prefect tasks forward subprocess output line by line."""

from __future__ import annotations

import logging
import os
import sys

_NAME = "dinov2"


def get_logger(name: str | None = None) -> logging.Logger:
    """`dinov2` (or a child) logger with a single plain stderr handler, configured once."""
    root = logging.getLogger(_NAME)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("DINOV2_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return root if not name else root.getChild(name)


def progress_kwargs() -> dict:
    """tqdm settings: live bars on a terminal, a line every 10 s in a piped log (a DVC stage under Prefect, whose
    flow mirrors the bar in a progress artifact: `flows/progress.py`)."""
    tty = sys.stderr.isatty()
    # In a log, a bar that ends within 2 s is not shown at all: a stage that fails at once prints its one error line.
    return {"file": sys.stderr, "mininterval": 0.2 if tty else 10.0, "delay": 0.0 if tty else 2.0,
            "dynamic_ncols": tty, "disable": False}
