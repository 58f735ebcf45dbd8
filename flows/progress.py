"""Progress bars of a stage subprocess, as a person watching the Prefect UI wants them.

A stage's tqdm bars (ingest, embedding, training, feature extraction) stay live on a terminal. Piped into a Prefect
task log they would be one line per refresh, several a second; the flow forwards at most one line per bar every
`interval_s` (the first and the last always) and mirrors each bar in a Prefect progress artifact, updated with the
same lines, so the flow-run page shows how far a long stage is while it runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# tqdm's default line: "desc:  44%|████▍     | 199/450 [01:14<01:31,  2.74it/s, loss=6.713]"
_BAR = re.compile(r"^(?P<desc>[^|]*?):\s+(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\b")


@dataclass
class Bar:
    desc: str
    n: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.n / self.total if self.total else 0.0

    @property
    def done(self) -> bool:
        return self.total > 0 and self.n >= self.total


def parse_bar(line: str) -> Bar | None:
    """The bar a tqdm status line shows, or None for any other line."""
    match = _BAR.match(line.strip())
    if not match:
        return None
    return Bar(match["desc"].strip(), int(match["n"]), int(match["total"]))


@dataclass
class ProgressRelay:
    """Decides which output lines reach the log, and reports each bar's progress to `report(desc, percent)`."""

    interval_s: float = 10.0
    report: Callable[[str, float], None] | None = None
    clock: Callable[[], float] = time.monotonic
    _state: dict[str, tuple[float, bool]] = field(default_factory=dict)  # bar -> (last forwarded, finished)

    def forward(self, line: str) -> bool:
        bar = parse_bar(line)
        if bar is None:
            return True
        now = self.clock()
        previous = self._state.get(bar.desc)
        if previous is not None:
            last, finished = previous
            if finished and bar.done:
                return False  # tqdm repeats a finished bar's line when it closes
            if not finished and not bar.done and now - last < self.interval_s:
                return False
        self._state[bar.desc] = (now, bar.done)  # a finished bar whose name shows up again is a new bar
        if self.report is not None:
            self.report(bar.desc, bar.percent)
        return True
