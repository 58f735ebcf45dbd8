"""The lent GPU machine's run, rehearsed here on the CPU before device time is spent: ``python -m benchmarks.device_rehearsal``.

A device session is rare and one-shot, and its machine runs our code under its own image (python 3.12, torch 2.11,
numpy 2.5: ../.library/device/KINDS.md), not under this project's pins. This builds a python 3.12 venv with those
versions and the image's other packages that the check imports (infra/device/preinstalled.txt, at whatever the
registry resolves), copies what a device call carries (the working tree git sees, and device_bundle.CARRY) to a
temporary folder, and runs device_bundle.DEVICE_COMMAND there with ``--dry-run``: the bundle installs, every import
resolves and every section runs at toy size on the image's versions. Run ``python -m benchmarks.device_bundle``
first. Needs python3.12 on the PATH and the package registry; ~5 minutes the first time (the venv is kept in
.device-rehearsal/), ~1 minute after.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.device_bundle import BUNDLE, CARRY, DEVICE_COMMAND, PREINSTALLED, _norm

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".device-rehearsal"
# the image's versions as sessions read them there (KINDS.md, "pip list", 2026-11); the CPU build of torch 2.11 is
# the same Python code as its CUDA one
IMAGE_PINS = ["torch==2.11.0", "torchvision==0.26.0", "numpy==2.5.2"]
NOT_FROM_REGISTRY = {"pip", "torch", "torchvision", "torchaudio", "triton", "numpy"}


def image_requirements() -> list[str]:
    """The pins above, and every preinstalled distribution of the image that this project's venv also has."""
    image = {_norm(line) for line in PREINSTALLED.read_text().split("\n") if line and not line.startswith("#")}
    ours = {_norm(d.metadata["Name"]) for d in md.distributions()}
    shared = {d for d in image & ours if d not in NOT_FROM_REGISTRY and not d.startswith(("nvidia", "cuda"))}
    return IMAGE_PINS + sorted(shared)


def find_python312() -> str | None:
    """A python 3.12 that runs (a pyenv shim on the PATH may not: its version is not selected), else None."""
    candidates = [shutil.which("python3.12"), *map(str, sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")))]
    for python in filter(None, candidates):
        probe = subprocess.run([python, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], check=False,
                               capture_output=True)
        if probe.returncode == 0:
            return python
    return None


def build_venv(python: str) -> Path:
    marker = VENV / "requirements.txt"
    wanted = "\n".join(image_requirements()) + "\n"
    if not (marker.exists() and marker.read_text() == wanted):
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([python, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", *wanted.split()], check=True)
        marker.write_text(wanted)
    return VENV / "bin"


def carried_tree(dest: Path) -> None:
    """What a device call copies: files git tracks or would track, and the carried ignored paths."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for rel in CARRY:
        if (REPO / rel).exists():
            shutil.copytree(REPO / rel, dest / rel)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=None, help="a python 3.12 interpreter (default: found on the PATH or pyenv)")
    args = ap.parse_args(argv)
    args.python = args.python or find_python312()
    if not args.python:
        print("no python 3.12 found: pass --python /path/to/python3.12", file=sys.stderr)
        return 2
    if not (BUNDLE / "wheels").is_dir():
        print(f"no {BUNDLE.name}/wheels: run `python -m benchmarks.device_bundle` first", file=sys.stderr)
        return 2
    bin_dir = build_venv(args.python)
    with tempfile.TemporaryDirectory(prefix="device-rehearsal-") as tmp:
        tree, out, site = Path(tmp) / "tree", Path(tmp) / "out", Path(tmp) / "site"
        tree.mkdir()
        out.mkdir()
        carried_tree(tree)
        command = DEVICE_COMMAND.replace("/tmp/site", str(site)) + " --dry-run"
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(out)}
        env.pop("PYTHONPATH", None)
        print(f"rehearsing in {tree}: {command}", flush=True)
        code = subprocess.run(["bash", "-c", command], cwd=tree, env=env, check=False).returncode
        report_path = out / "gpu_check.json"
        if not report_path.exists():
            print(f"the device command wrote no report (exit {code})", file=sys.stderr)
            return 1
        report = json.loads(report_path.read_text())
        saved = REPO / "reports" / "bench" / "device_rehearsal.md"
        saved.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(report_path.with_suffix(".md"), saved)
        env_row = report["environment"]
        print(f"python 3.12, torch {env_row['torch']}, faiss {env_row['faiss']}: passed={report['passed']}, "
              f"{report['seconds']:.0f} s; report in {saved.relative_to(REPO)}")
        return 0 if code == 0 and report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
