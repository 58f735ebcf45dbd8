"""What a bare GPU machine needs to run the GPU check, in one folder to carry: ``python -m benchmarks.device_bundle``.

The lent H200 (../.library/device) has python 3.12 and torch but nothing of ours and no package registry, and a call
carries at most 64 MiB. This writes ``.device/`` (git-ignored):
  wheels/         the distributions the GPU check imports that the image lacks (infra/device/preinstalled.txt), at
                  this venv's versions, as cp312 manylinux wheels. The list is measured: ``gpu_check --dry-run``
                  runs here and its imported modules are mapped to distributions;
  fashion-mnist/  the quality run's data (Debian's dataset-fashion-mnist files);
and prints the size and the device command. Left out to fit (the GPU check runs without them, tested by
tests/test_gpu_check.py): the optional imports of great-expectations (boto3/botocore, SQLAlchemy, cryptography, redis)
and faiss-gpu: the registry's only build (faiss-gpu 1.15.1) is for CUDA 12, a 135 MiB wheel that also needs cuBLAS 12
beside the image's CUDA 13, so the faiss section runs faiss-cpu there and says why its GPU half did not run. Every
wheel is recompressed with LZMA (``lzma_wheel``: pip reads any zip method, the files and RECORD stay byte-identical),
which halves faiss-cpu's 18 MiB and lets it fit beside the data. xformers has no build for the image's torch 2.11.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / ".device"
PREINSTALLED = REPO / "infra" / "device" / "preinstalled.txt"
# optional at import time (their users try/except the import), left out to fit the 64 MiB
LEFT_OUT = {"boto3", "botocore", "s3transfer", "sqlalchemy", "cryptography", "redis", "faiss-gpu", "faiss-gpu-cu12",
            "xformers", "dinov2-pipeline"}  # ours travels as source
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64",
             "manylinux1_x86_64"]
CARRY_LIMIT_MIB = 64
# `;`, not `&&`: should the install fail there, the check still runs what needs only the image (each section reports)
DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl; "
    "PYTHONPATH=/tmp/site:. FASHION_MNIST_DIR=.device/fashion-mnist PYTHONUNBUFFERED=1 "
    "python3 -m benchmarks.gpu_check --out $OUT/gpu_check --deadline-s 530"
)
CARRY = [".device", "third_party/dinov2/dinov2"]
# the device call's limit for that command: the install (seconds) and the check's 530 s, with a margin for the
# quality run's estimate of its own tail; one call of the session's 15 device minutes, a machine's start included
DEVICE_TIMEOUT_S = 580


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions() -> dict[str, str]:
    """name -> version of every installed distribution whose modules the GPU check's dry run imports."""
    from benchmarks import gpu_check

    gpu_check.main(["--dry-run", "--out", str(REPO / "reports" / "bench" / "device_bundle_probe")])
    by_module = md.packages_distributions()
    dists = {d for mod in list(sys.modules) for d in by_module.get(mod.split(".")[0], [])}
    return {_norm(d): md.version(d) for d in dists}


def _download(dist: str, version: str, dest: Path) -> bool:
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *platforms, "-d", str(dest), f"{dist}=={version}"]
    return subprocess.run(cmd, check=False, capture_output=True, text=True).returncode == 0


def lzma_wheel(wheel: Path) -> None:
    """Rewrite ``wheel`` in place with every member LZMA-compressed (deflate in the registry's): the same members, bytes
    and order, so its RECORD hashes still hold and pip installs it as before, in about half the bytes of binaries."""
    tmp = wheel.with_name(wheel.name + ".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info), compress_type=zipfile.ZIP_LZMA)
    tmp.replace(wheel)


def _mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    from tests.train._shards import FASHION_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=BUNDLE)
    args = ap.parse_args(argv)
    have = {_norm(line) for line in PREINSTALLED.read_text().split("\n") if line and not line.startswith("#")}
    need = {d: v for d, v in imported_distributions().items() if d not in have | LEFT_OUT}
    shutil.rmtree(args.out, ignore_errors=True)
    (args.out / "wheels").mkdir(parents=True)
    failed = [f"{d}=={v}" for d, v in sorted(need.items()) if not _download(d, v, args.out / "wheels")]
    for wheel in sorted((args.out / "wheels").glob("*.whl")):
        lzma_wheel(wheel)
    shutil.copytree(FASHION_DIR, args.out / "fashion-mnist")
    tracked = subprocess.run(["git", "ls-files", "-z"], check=True, cwd=REPO, capture_output=True, text=True).stdout
    repo_mib = sum((REPO / f).stat().st_size for f in tracked.split("\0") if f and (REPO / f).is_file()) / 2**20
    official = REPO / CARRY[1]
    total = _mib(args.out) + repo_mib + (_mib(official) if official.is_dir() else 0)
    print(f"{args.out}: {len(need) - len(failed)} wheels {_mib(args.out / 'wheels'):.1f} MiB, Fashion-MNIST "
          f"{_mib(args.out / 'fashion-mnist'):.1f} MiB; with the repository and the official source {total:.1f} MiB "
          f"of the {CARRY_LIMIT_MIB} MiB a device call carries")
    if not official.is_dir():
        print(f"no {CARRY[1]} (`make official`): the GPU check will run without the official comparison")
    print(f"device run: carry={CARRY}, timeout_s={DEVICE_TIMEOUT_S}\n  command: {DEVICE_COMMAND}")
    if failed:
        print("no cp312 wheel for: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed or total > CARRY_LIMIT_MIB else 0


if __name__ == "__main__":
    sys.exit(main())
