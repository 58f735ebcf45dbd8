"""What a round of the curation loop costs on this machine and what it gains: ``python -m benchmarks.curation_loop``
(~25 min on 2 cores; not part of ``make bench``).

Runs the loop profile (params.loop.yaml: a crawl with look-alike distractors, round 1 curated with the copy-detection
descriptor, round 2 with round 1's teacher) through the pipeline flow in a fresh copy of the project, so every stage
really runs, and writes reports/bench/curation_loop.{json,md}: each round's stages and seconds, and the rounds'
table (curated-set cleanliness on the ground truth, the teacher's k-NN / linear / segmentation)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "reports" / "bench" / "curation_loop"
PROJECT_FILES = ("dvc.yaml", ".dvcignore", "params.yaml")


def fresh_project(dest: Path, profile: str) -> Path:
    """A throwaway copy of the project (its code, dvc.yaml, params and the profile) as its own git + DVC repo."""
    dest.mkdir(parents=True)
    for name in (*PROJECT_FILES, profile):
        shutil.copy(REPO / name, dest / name)
    for code in ("tasks", "dinov2_core"):
        shutil.copytree(REPO / code, dest / code, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=dest, check=True)
    return dest


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="params.loop.yaml")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.pipeline import dinov2_pipeline
    from tasks.loop import round_rows, round_table
    from tasks.params import load_params

    with tempfile.TemporaryDirectory(prefix="curation-loop-") as tmp:
        project = fresh_project(Path(tmp) / "project", args.profile)
        start = time.perf_counter()
        cwd = Path.cwd()
        os.chdir(project)  # stage commands resolve relative paths from the project
        try:
            result = dinov2_pipeline(profile=args.profile, project_dir=str(project), push=False, experiment=False)
        finally:
            os.chdir(cwd)
        wall = time.perf_counter() - start
        params = load_params(project / args.profile)
        os.chdir(project)
        try:
            rows = round_rows(params)
        finally:
            os.chdir(cwd)
    rounds: dict[str, dict] = {}
    for r in result["stages"]:
        name = r["stage"].split("@")[1] if "@" in r["stage"] else "round-1"
        entry = rounds.setdefault(name, {"seconds": 0.0, "stages": {}})
        entry["seconds"] = round(entry["seconds"] + r["seconds"], 1)
        entry["stages"][r["stage"]] = r["seconds"]
    report = {"benchmark": "curation_loop", "profile": args.profile, "wall_s": round(wall, 1), "rounds": rounds,
              "table": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    cost = "\n".join(f"- {name}: {info['seconds']:.0f} s ({', '.join(f'{s} {v:.0f} s' for s, v in info['stages'].items())})"
                     for name, info in rounds.items())
    md = (f"# Curation loop ({args.profile}), {wall / 60:.1f} min on this machine\n\n{round_table(rows)}\n"
          f"Seconds per round:\n\n{cost}\n")
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return report


if __name__ == "__main__":
    main()
