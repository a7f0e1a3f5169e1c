"""bench/gpu/ort_gpu_wheel.py: onnxruntime-gpu split into parts the GPU machine's transfers carry, then joined,
verified and installed there (issue 23). Here on a small wheel made in the test, with the real one's name,
tags and CUDA metadata."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH / "gpu"))
import ort_gpu_wheel as wheels  # noqa: E402

NAME = "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl"
ANY_PYTHON = "onnxruntime_gpu-1.31.1-py3-none-any.whl"  # the same, installable by any Python (this machine runs 3.11)


def fake_wheel(folder: Path, *, name: str = NAME, cuda: str = "nvidia-cuda-runtime~=13.0; extra == \"cuda\"",
               payload_bytes: int = 3 << 20) -> Path:
    """An installable wheel: a package `onnxruntime` with a (random, incompressible) payload, and metadata whose
    Requires-Dist lines name the CUDA runtime as onnxruntime-gpu 1.31's do."""
    dist = "onnxruntime_gpu-1.31.1.dist-info"
    files = {
        "onnxruntime/__init__.py": b"__version__ = '1.31.1+fake'\n",
        "onnxruntime/capi/payload.bin": os.urandom(payload_bytes),
        f"{dist}/METADATA": (f"Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.31.1\n"
                             f"Requires-Dist: numpy>=1.21.6\nRequires-Dist: {cuda}\n").encode(),
        f"{dist}/WHEEL": ("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: "
                          + "-".join(name[: -len(".whl")].split("-")[2:]) + "\n").encode(),
    }
    files[f"{dist}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"]).encode()
    path = folder / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n, data in files.items():
            z.writestr(n, data)
    return path


def test_checks_the_python_platform_and_cuda_of_the_wheel(tmp_path):
    assert wheels.check_wheel(fake_wheel(tmp_path)) == 13
    (tmp_path / "12").mkdir()
    cu12 = fake_wheel(tmp_path / "12", cuda="nvidia-cuda-runtime-cu12~=12.0; extra == \"cuda\"", payload_bytes=10)
    with pytest.raises(wheels.WheelError, match="built for CUDA 12; the GPU image has CUDA 13"):
        wheels.check_wheel(cu12)
    (tmp_path / "py").mkdir()
    other = fake_wheel(tmp_path / "py", name=NAME.replace("cp312-cp312", "cp311-cp311"), payload_bytes=10)
    with pytest.raises(wheels.WheelError, match="Python 3.12"):
        wheels.check_wheel(other)
    (tmp_path / "cpu").mkdir()
    cpu = fake_wheel(tmp_path / "cpu", name=NAME.replace("onnxruntime_gpu", "onnxruntime"), payload_bytes=10)
    with pytest.raises(wheels.WheelError, match="not onnxruntime_gpu"):
        wheels.check_wheel(cpu)
    (tmp_path / "none").mkdir()
    with pytest.raises(wheels.WheelError, match="names no NVIDIA CUDA runtime"):
        wheels.check_wheel(fake_wheel(tmp_path / "none", cuda="packaging", payload_bytes=10))


def test_parts_join_back_into_the_wheel_and_install(tmp_path):
    wheel = fake_wheel(tmp_path, name=ANY_PYTHON)  # installable on this machine's Python too
    manifest = wheels.split(wheel, tmp_path / "parts", part_mib=1, cuda_major=13)
    assert [p["file"] for p in manifest["parts"]] == ["part-00", "part-01", "part-02", "part-03"]
    assert all(p["bytes"] <= 1 << 20 for p in manifest["parts"]) and manifest["sha256"] == wheels.sha256(wheel)
    (tmp_path / "joined").mkdir()
    joined = wheels.join(tmp_path / "parts", tmp_path / "joined")
    assert joined.name == ANY_PYTHON and joined.read_bytes() == wheel.read_bytes()
    target = wheels.install(tmp_path / "parts", tmp_path / "site")
    assert (target / "onnxruntime" / "__init__.py").read_text() == "__version__ = '1.31.1+fake'\n"
    run = subprocess.run([sys.executable, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                         env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "1.31.1+fake"  # first on PYTHONPATH: it shadows the CPU build


def test_a_missing_or_broken_part_is_named(tmp_path):
    wheel = fake_wheel(tmp_path)
    parts = tmp_path / "parts"
    wheels.split(wheel, parts, part_mib=1, cuda_major=13)
    (parts / "part-02").unlink()
    with pytest.raises(wheels.WheelError, match="part-02 of 4 parts missing"):
        wheels.join(parts, tmp_path)
    wheels.split(wheel, parts, part_mib=1, cuda_major=13)
    with open(parts / "part-01", "r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(wheels.WheelError, match="part-01 in .* differ from the manifest"):
        wheels.join(parts, tmp_path)
    (parts / wheels.MANIFEST).unlink()
    with pytest.raises(wheels.WheelError, match="manifest.json is missing"):
        wheels.join(parts, tmp_path)


def test_prepare_prints_one_device_call_a_part_within_the_transfer_limit(tmp_path):
    wheel = fake_wheel(tmp_path)
    out = tmp_path / "parts"
    run = subprocess.run([sys.executable, str(BENCH / "gpu" / "ort_gpu_wheel.py"), "prepare", "--wheel", str(wheel),
                          "--out", str(out), "--part-mib", "1"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    calls = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [c["carry"][0] for c in calls] == [str(out / f"part-{i:02d}") for i in range(4)]
    assert calls[-1]["carry"][1] == str(out / "manifest.json") and "ort_cuda ort_bench" in calls[-1]["command"]
    assert all(len(c["carry"]) <= 8 and len(c["command"]) <= 2000 for c in calls)  # the device tool's limits
    bad = subprocess.run([sys.executable, str(BENCH / "gpu" / "ort_gpu_wheel.py"), "prepare", "--wheel", str(wheel),
                          "--out", str(out), "--part-mib", "64"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "leave room for the working tree" in bad.stderr


def test_the_parts_are_ignored_by_git():
    root = Path(__file__).resolve().parents[1]
    check = subprocess.run(["git", "check-ignore", "-q", ".ort-gpu/part-00"], cwd=root)
    assert check.returncode == 0 or not (root / ".git").exists()
