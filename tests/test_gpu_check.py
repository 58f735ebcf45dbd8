"""The GPU check script's dry run: every section runs on the CPU at toy size and writes its report (issue 16: a
lent GPU session runs the same script at full size)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_fills_every_section(tmp_path):
    out = tmp_path / "gpu_check"
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out),
                          "--deadline-s", "600"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["environment"]["dry_run"] and report["passed"] and report["unfinished"] == []
    assert "profile" not in report and "attention_speed" not in report  # diagnostics: on request only
    keys = list(report)  # the quality run last: it sizes itself to the time the others left
    assert keys.index("quality") > max(keys.index(k) for k in ("attention", "crops", "speed", "vs_official", "faiss"))
    for section in ("attention", "bf16_step", "crops", "fsdp", "speed", "vs_official", "faiss", "quality"):
        assert report[section]["passed"] and "error" not in report[section], section
    backends = {row["backend"] for row in report["attention"]["rows"]}
    assert {"sdpa", "packed_sdpa", "eager"} <= backends
    assert all(0 < row["mfu"] < 1 for row in report["speed"]["rows"])
    assert report["faiss"]["rows"][0]["recall_at_64"] > 0.3
    q = report["quality"]  # the pretrain stage really ran, and the three k-NN figures sit side by side
    assert q["iterations"] == 4 and all(0 < q[k] <= 1 for k in ("teacher_knn_top1", "random_init_knn_top1",
                                                               "raw_pixels_knn_top1"))
    # through loader processes, as on the GPU host, and the report says how much of an iteration waited for data
    assert q["loader_workers"] == 2 and 0 <= q["data_wait_fraction"] <= 1 and q["images_per_s"] > 0
    assert q["loader_only_images_per_s"] > 0  # the same loader without a model: who bounds the run
    # the calibration run that sizes the GPU run measured a step (the dry run keeps its 4 iterations)
    assert q["calibration_step_s"] > 0 and 1500 <= q["iterations_for_budget"] <= 3000  # whole toy epochs of 2
    assert q["cut_by_deadline"] is False and q["seconds_left_for_training"] > 0 and q["stage_fixed_s"] > 0
    assert report["crops"]["max_abs_diff_vs_cpu"] < 1e-3 and report["crops"]["render_s"] > 0
    md = out.with_suffix(".md").read_text()
    assert all(f"| {s} | True |" in md for s in ("attention", "bf16_step", "fsdp", "speed", "faiss", "quality"))
    quality_row = next(line for line in md.splitlines() if line.startswith("| quality |"))
    assert all(f"{k}=" in quality_row for k in ("teacher_knn_top1", "raw_pixels_knn_top1", "iterations_for_budget"))


def test_gpu_check_runs_without_what_the_device_bundle_leaves_out(tmp_path):
    """A bare GPU machine gets only benchmarks/device_bundle.py's wheels: the optional imports it leaves out
    (great-expectations' AWS/SQL extras, ...) made unimportable here, the quality run (the real pretrain stage with its
    GX checks, in its own torchrun process) still passes; and on a machine without faiss at all the faiss section says
    why it did not run."""
    from benchmarks.device_bundle import LEFT_OUT

    blocked = tmp_path / "blocked"
    left_out = {"boto3", "botocore", "s3transfer", "sqlalchemy", "cryptography", "redis"}
    assert left_out <= LEFT_OUT and "faiss-cpu" not in LEFT_OUT
    for module in left_out | {"faiss"}:
        (blocked / module).mkdir(parents=True)
        (blocked / module / "__init__.py").write_text(f"raise ImportError('{module} is not on this machine')\n")
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}"}
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out),
                          "--sections", "faiss", "quality"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["faiss"]["passed"] is None and "faiss is not installed" in report["faiss"]["skipped"]
    assert report["quality"]["passed"] and report["quality"]["iterations"] == 4
    assert "attention" not in report and report["passed"]


def test_gpu_check_killed_mid_run_keeps_the_sections_it_finished(tmp_path):
    """The device call has a hard time limit: a run cut short there must still bring back what it measured."""
    out = tmp_path / "gpu_check"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out),
                             "--sections", "attention", "quality"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not out.with_suffix(".json").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the quality run (a torchrun pretrain stage, >10 s) has just started
    finally:
        proc.wait(timeout=60)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["attention"]["passed"] and "quality" not in report
    assert report["unfinished"] == ["quality"]
    assert "Not reached (the run stopped before them): quality" in out.with_suffix(".md").read_text()


def test_mfu_peak_is_the_gpus_spec_and_an_unlisted_gpu_reports_none_rather_than_failing(monkeypatch):
    import torch

    from benchmarks import gpu_check

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")
    assert gpu_check.spec_bf16_peak_flops(cuda) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA GeForce RTX 4090")
    assert gpu_check.spec_bf16_peak_flops(cuda) is None  # was None * 1e12: the speed sections raised TypeError
    assert gpu_check.spec_bf16_peak_flops(torch.device("cpu")) is None


def test_quality_run_iterations_fill_the_budget_within_the_replicated_configuration_and_twice_it():
    from benchmarks.gpu_check import QUALITY_BUDGET_S, quality_iterations

    assert quality_iterations(QUALITY_BUDGET_S / 2000, 100) == 2000  # what the budget allows, whole epochs
    assert quality_iterations(QUALITY_BUDGET_S / 2050, 100) == 2000
    assert quality_iterations(0.001, 100) == 3000  # never more than twice the CPU-replicated 1,500
    assert quality_iterations(1.0, 100) == 1500  # a slow machine still runs the replicated configuration
    assert quality_iterations(None, 100) == quality_iterations(float("nan"), 100) == 1500
    # a deadline cuts it to the training time left (whole epochs, below the replicated 1,500 if it must), never to 0
    assert quality_iterations(0.1, 100, train_s_left=1000.0) == 1800  # room left: the budget decides
    assert quality_iterations(0.1, 100, train_s_left=105.0) == 1000
    assert quality_iterations(1.0, 100, train_s_left=-5.0) == 100


def test_quality_run_that_the_deadline_leaves_no_time_says_so_instead_of_overrunning(tmp_path):
    """Last in the device call, the quality run must not start training it cannot finish before --deadline-s: the
    report says it was skipped and why (not a failure), with the calibration it measured."""
    out = tmp_path / "gpu_check"
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out),
                          "--sections", "quality", "--deadline-s", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    q = json.loads(out.with_suffix(".json").read_text())["quality"]
    assert q["passed"] is None and "deadline left" in q["skipped"] and q["cut_by_deadline"]
    assert q["calibration_step_s"] > 0 and q["seconds_left_for_training"] < 0 and "iterations" not in q


def test_faiss_section_on_a_gpu_with_cpu_only_faiss_reports_no_gpu_row():
    """faiss-cpu on a CUDA machine (what the lent H200 gets) moves no index to the GPU: the section must give one CPU
    row and say why the GPU half did not run, never a second CPU timing labelled GPU."""
    import torch

    from benchmarks.gpu_check import faiss_check

    sec = faiss_check(torch.device("cuda"), dry_run=True)  # only the device's type is read: no GPU is touched
    assert [row["gpu"] for row in sec["rows"]] == [False] and sec["faiss_gpus"] == 0
    assert "CPU-only" in sec["gpu_not_run"] and sec["passed"]


def test_a_wheel_recompressed_for_the_device_carry_installs_byte_identical(tmp_path):
    """device_bundle rewrites the wheels with LZMA to fit faiss-cpu into the 64 MiB a device call carries: pip must
    still install them (RECORD's hashes checked) and every file must come out unchanged."""
    import base64
    import hashlib
    import zipfile

    from benchmarks.device_bundle import lzma_wheel

    files = {"demo_pkg/__init__.py": b"VALUE = 42\n", "demo_pkg/blob.bin": bytes(range(256)) * 400}
    meta = "demo_pkg-1.0.dist-info/"
    files[meta + "METADATA"] = b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n"
    files[meta + "WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + f"{meta}RECORD,,\n"
    files[meta + "RECORD"] = record.encode()
    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    lzma_wheel(wheel)
    with zipfile.ZipFile(wheel) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_LZMA}
        assert {name: zf.read(name) for name in zf.namelist()} == files
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), str(wheel)], check=True, capture_output=True, timeout=120)
    assert (target / "demo_pkg" / "blob.bin").read_bytes() == files["demo_pkg/blob.bin"]


def test_device_rehearsal_runs_the_image_versions_on_what_a_device_call_carries(tmp_path):
    """The rehearsal is only worth its minutes if it copies what the device gets (tracked and untracked-unignored
    files; no venv, no build outputs) and pins the image's torch and numpy rather than this project's."""
    from benchmarks.device_rehearsal import IMAGE_PINS, carried_tree, image_requirements

    carried_tree(tmp_path)
    assert (tmp_path / "benchmarks" / "gpu_check.py").is_file() and (tmp_path / "pyproject.toml").is_file()
    assert not (tmp_path / ".venv").exists() and not (tmp_path / "reports" / "bench").exists()
    reqs = image_requirements()
    assert reqs[:len(IMAGE_PINS)] == IMAGE_PINS and "pandas" in reqs  # pandas: preinstalled there, imported here
    assert not any(r.startswith(("torch", "numpy", "nvidia")) for r in reqs[len(IMAGE_PINS):])


def test_speed_section_times_the_checkpointed_and_compiled_training_steps_next_to_the_eager_one():
    """On the GPU the ViT-L/14 step is also timed with activation checkpointing and with compiled blocks
    (`launch.activation_checkpointing`, `launch.compile`): each row must come from a step that really ran that way
    (the checkpointed one keeps less for backward; the compiled one compiled, its one-off time reported apart)."""
    import torch

    from benchmarks.gpu_check import speed

    name = "ViT-tiny/14 (dry run)"
    sec = speed(torch.device("cpu"), dry_run=True, compiled=(name,))
    rows = {r["model"]: r for r in sec["rows"]}
    assert list(rows) == [name, f"{name}, activation checkpointing", f"{name}, compiled blocks"]
    assert sec["compile_errors"] == {} and sec["compile_s"][f"{name}, compiled blocks"] > 0
    assert all(r["images_per_s"] > 0 for r in sec["rows"])
    eager, recomputed = rows[name]["saved_for_backward_gib"], rows[f"{name}, activation checkpointing"][
        "saved_for_backward_gib"]
    assert recomputed < 0.7 * eager, (recomputed, eager)
    assert rows[f"{name}, compiled blocks"]["saved_for_backward_gib"] > recomputed  # compiled, not checkpointed


def test_a_section_failing_without_a_message_is_reported_not_fatal(tmp_path, monkeypatch):
    """A bare `assert` or `raise RuntimeError()` in one section (empty message) used to raise IndexError while the
    failure was being written down, ending the whole run: one device call would have lost every later section."""
    from benchmarks import gpu_check

    def fails(dev, dry):
        raise AssertionError()

    monkeypatch.setitem(gpu_check.SECTIONS, "attention", fails)
    report = gpu_check.main(["--dry-run", "--out", str(tmp_path / "gc"), "--sections", "attention", "crops"])
    assert report["attention"]["passed"] is False and report["attention"]["error"] == "AssertionError: "
    assert report["crops"]["passed"] and report["unfinished"] == []


def test_speed_diagnostics_run_on_request_only_and_fill_their_reports(tmp_path):
    """`--sections profile attention_speed` (what the README's "what limits the MFU" figures came from on the H200):
    the step's time by kernel class, ours next to the official code, and attention's kernels on the two crop shapes.
    They are not in the default run, whose time the quality run's budget depends on."""
    from benchmarks import gpu_check
    from benchmarks.backbone import official_source

    assert not set(gpu_check.DIAGNOSTICS) & set(gpu_check.SECTIONS)
    official = official_source() is not None  # a fresh clone has no official source: ours alone, and says why
    out = tmp_path / "gpu_check"
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out),
                          "--sections", "profile", "attention_speed"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.with_suffix(".json").read_text())
    prof = report["profile"]
    assert [r["variant"] for r in prof["rows"]] == ["ours, compiled blocks"] + ["official"] * official + [
        "ours, compiled blocks, one pass per crop size"]
    assert ("official_skipped" in prof) is not official
    for row in prof["rows"]:
        # shares are of a wall time measured apart from the profiled steps (no upper bound: a noisy machine can
        # slow the profiled ones); the matmuls' ceiling lies above the step's MFU (matmuls: 22-33 % of a CPU step)
        assert row["ms_per_step"]["matmul"] > 0 and sum(row["share_of_step"].values()) > 0
        assert row["mfu"] < row["mfu_if_only_matmuls"]
    micro = report["attention_speed"]["micro"]
    assert {(m["shape"], m["kernel"]) for m in micro} >= {("global", "eager"), ("local", "eager"),
                                                          ("global", "sdpa (torch's pick)")}
    steps = report["attention_speed"]
    assert [r["variant"] for r in steps["rows"]] == (["ours", "official", "ours, eager attention"] if official else [])
    assert ("step_comparison_skipped" in steps) is not official
    md = out.with_suffix(".md").read_text()
    assert "| profile | True |" in md and "| attention_speed | True |" in md


def test_kernel_classes_name_the_h200s_kernels():
    from benchmarks.gpu_check import kernel_class

    assert kernel_class("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64") == "attention"
    assert kernel_class("triton_poi_fused_gelu_gelu_backward_view_5") == "fused_triton"
    assert kernel_class("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunc") == "other"
