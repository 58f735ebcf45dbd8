"""What the Prefect UI shows while and after a stage runs: progress bars thinned in the logs (at most one line per bar
every ~10 s, the last always, other lines untouched) and mirrored as progress artifacts; summary tables as table
artifacts."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from tqdm import tqdm

from flows.progress import ProgressRelay, parse_bar


def _tqdm_lines(total: int, desc: str, **kwargs) -> list[str]:
    """What a real tqdm bar writes into a pipe, split the way the flow reads it (\\r and \\n end lines)."""
    out = io.StringIO()
    with tqdm(total=total, desc=desc, file=out, mininterval=0, miniters=1, **kwargs) as bar:
        for _ in range(total):
            bar.update(1)
            bar.set_postfix(loss=1.234, refresh=False)
    return [ln for ln in re.split(r"[\r\n]", out.getvalue()) if ln.strip()]


def test_parse_bar_reads_real_tqdm_lines_and_nothing_else():
    lines = _tqdm_lines(50, "features random-init[pretrain-teacher]", unit="batch")
    bars = [parse_bar(ln) for ln in lines]
    assert all(b is not None for b in bars)
    assert bars[-1].desc == "features random-init[pretrain-teacher]" and bars[-1].n == 50 and bars[-1].done
    assert parse_bar("05:48:46 INFO dinov2.eval: eval: pretrain-teacher k-NN top-1 0.677") is None
    assert parse_bar("Running stage 'ingest':") is None


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_relay_thins_each_bar_to_one_line_per_interval_and_keeps_the_last():
    clock = _Clock()
    reports: list[tuple[str, float]] = []
    relay = ProgressRelay(interval_s=10.0, report=lambda bar, pct: reports.append((bar, pct)), clock=clock)
    train = _tqdm_lines(600, "pretrain", unit="it")  # 600 updates over 120 s
    embed = _tqdm_lines(300, "embed", unit="img")
    forwarded = []
    for i, line in enumerate(train):  # another bar (done after 60 s) and plain log lines interleaved
        clock.now = i * 0.2
        for candidate in (line, embed[min(i, len(embed) - 1)], f"INFO step {i}"):
            if relay.forward(candidate):
                forwarded.append(candidate)
    per_bar = {"pretrain": [ln for ln in forwarded if ln.startswith("pretrain")],
               "embed": [ln for ln in forwarded if ln.startswith("embed")]}
    assert all(1 < len(lines) <= 120 / 10 + 2 for lines in per_bar.values())  # 120 s: one per 10 s + the last
    assert all(parse_bar(lines[-1]).done for lines in per_bar.values())  # each bar's 100 % line, once
    assert all(sum(parse_bar(ln).done for ln in lines) == 1 for lines in per_bar.values())
    assert sum(ln.startswith("INFO step") for ln in forwarded) == len(train)  # other lines all pass
    pct = [p for bar, p in reports if bar == "pretrain"]
    assert pct == sorted(pct) and pct[-1] == 100.0 and len(pct) == len(per_bar["pretrain"])


def test_a_bar_that_starts_again_is_shown_again():
    """Eval extracts features for several splits under one name: each new bar's first line is forwarded."""
    clock = _Clock()
    relay = ProgressRelay(interval_s=10.0, clock=clock)
    first, second = _tqdm_lines(5, "features x"), _tqdm_lines(5, "features x")
    shown = [parse_bar(ln) for ln in first + second if relay.forward(ln)]
    assert [(b.n, b.done) for b in shown if b.n in (0, 5)] == [(0, False), (5, True), (0, False), (5, True)]


@pytest.fixture(scope="module")
def prefect_api():
    """A throw-away Prefect server and database for this module, stopped when its tests end."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def _run_artifacts(state) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return {f"{a.type}:{a.key}": a.data for a in found}


def test_a_stage_bar_becomes_a_progress_artifact_of_the_flow_run(prefect_api):
    """The wiring, with a real Prefect API: a subprocess's tqdm bar, streamed by the flow's task helper, is one
    progress artifact of that flow run, at 100 % when the bar finished."""
    import sys

    from prefect import flow, get_run_logger, task

    from flows import pipeline
    from flows.artifacts import progress_publisher

    script = ("import sys, time\nfrom tqdm import tqdm\n"
              "for _ in tqdm(range(20), desc='embed', file=sys.stderr, mininterval=0, miniters=1):\n"
              "    time.sleep(0.02)\n")

    @task
    def stream() -> tuple[int, list[str], bool]:
        return pipeline._stream([sys.executable, "-c", script], Path("."), dict(os.environ), get_run_logger(),
                                relay=ProgressRelay(interval_s=60.0, report=progress_publisher("toy")))

    @flow
    def toy_flow() -> tuple[int, list[str], bool]:
        return stream()

    state = toy_flow(return_state=True)
    code, lines, _ = state.result()
    assert code == 0 and sum(parse_bar(ln) is not None for ln in lines) >= 20
    progress = {k: v for k, v in _run_artifacts(state).items() if k.startswith("progress:")}
    assert progress == {"progress:toy-embed-progress": 100}


def test_a_stage_summary_table_becomes_a_table_artifact(prefect_api, tmp_path):
    """eval's `table` (backbones next to their baselines) in its metrics is published as a table artifact whose
    rows are the numbers of the metrics file."""
    import json

    from prefect import flow

    from flows.artifacts import metrics_table, publish_table

    rows = [{"backbone": "pretrain-teacher", "kind": "trained", "knn_top1_k20": 0.677, "linear_top1": 0.701},
            {"backbone": "raw-pixels", "kind": "raw-pixels", "knn_top1_k20": 0.766, "linear_top1": 0.744}]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"results": {}, "table": rows}))

    @flow
    def toy_flow() -> None:
        publish_table("eval-table", metrics_table(path), "eval: summary table")

    state = toy_flow(return_state=True)
    data = _run_artifacts(state)["table:eval-table"]
    assert json.loads(data) == rows  # Prefect stores a table artifact as its JSON
    assert metrics_table(tmp_path / "missing.json") is None


def test_figures_are_embedded_downscaled_and_a_broken_one_is_left_out(tmp_path):
    """Loss curves, PCA maps, segmentation samples: shown in the UI as pictures (JPEG data URIs of at most
    `max_side` pixels), the stage's own figures only; an unreadable file never fails the stage."""
    import base64

    import numpy as np
    from PIL import Image

    from flows.artifacts import figures_markdown

    figures = tmp_path / "reports" / "figures"
    (figures / "eval").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((1000, 2400, 3)) * 255).astype("uint8")).save(figures / "eval" / "pca_a.png")
    Image.fromarray((rng.random((200, 300, 3)) * 255).astype("uint8")).save(figures / "eval_loss.png")
    Image.fromarray((rng.random((50, 50, 3)) * 255).astype("uint8")).save(figures / "pretrain_loss.png")
    (figures / "eval" / "broken.png").write_bytes(b"not a png")
    md = figures_markdown("eval", tmp_path / "reports", max_side=720)
    uris = re.findall(r"\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)", md)
    assert len(uris) == 2 and "pca_a.png" in md and "eval_loss.png" in md and "pretrain_loss" not in md
    sizes = [Image.open(io.BytesIO(base64.b64decode(u))).size for u in uris]
    assert sorted(sizes) == [(300, 200), (720, 300)]
    assert figures_markdown("adapt", tmp_path / "reports") is None
