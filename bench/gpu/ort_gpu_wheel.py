"""onnxruntime-gpu for the GPU machine, in parts small enough for its transfers (issue 23).

The GPU machine's image has the CPU build of onnxruntime and no package index; one call to it carries at most
64 MiB, the onnxruntime-gpu wheel is about 256 MB. Ignored files already in its copy of the tree stay while it
is up (about 30 s after each call), so the wheel goes in parts, one a call, and the last call joins, checks and
installs them into a private folder and runs the stages (bench/gpu_check.sh's `ort_cuda` and `ort_bench`).

Here (the CPU machine, which reaches a package index):

    python bench/gpu/ort_gpu_wheel.py prepare --version 1.31.1     # or --wheel PATH; writes .ort-gpu/

checks the wheel (CPython 3.12, x86-64 Linux, built for the image's CUDA major, 13: from its metadata's
nvidia-* requirements), splits it into .ort-gpu/part-NN files and writes .ort-gpu/manifest.json (sizes and
SHA-256 of each part and of the whole), then prints the device calls, each carrying one part. On the GPU
machine, inside that stage:

    python bench/gpu/ort_gpu_wheel.py install --parts .ort-gpu --target /tmp/ort-gpu   # then PYTHONPATH=/tmp/ort-gpu

Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = Path(".ort-gpu")  # ignored by .gitignore: parts never enter the repository
MANIFEST = "manifest.json"
CALL_LIMIT_MIB = 64  # what one device call carries, the working tree included
IMAGE_CUDA_MAJOR = 13  # the GPU image's CUDA (nvidia-* pip packages beside its torch)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


class WheelError(ValueError):
    """A wheel, a part or the manifest is not what the GPU machine needs; the message says what to do."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def wheel_cuda_major(wheel: Path) -> int | None:
    """The CUDA major version a GPU wheel was built for, from its metadata's NVIDIA requirements
    (nvidia-cuda-runtime~=13.0, or the older nvidia-cuda-runtime-cu12 names); None if it names none."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        if not names:
            raise WheelError(f"{wheel.name} has no .dist-info/METADATA: not a wheel; download it again")
        metadata = z.read(names[0]).decode("utf-8", "replace")
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        found = re.search(r"nvidia-cuda-runtime-cu(\d+)", line) or re.search(r"nvidia-cuda-runtime\s*[~=>]=\s*(\d+)", line)
        if found:
            return int(found.group(1))
    return None


def check_wheel(wheel: Path, *, python_tag: str = "cp312", cuda_major: int = IMAGE_CUDA_MAJOR) -> int:
    """Raises WheelError unless `wheel` is onnxruntime-gpu for `python_tag` on x86-64 Linux built for CUDA
    `cuda_major`; returns that major."""
    parts = wheel.name[: -len(".whl")].split("-") if wheel.name.endswith(".whl") else []
    if len(parts) < 5:
        raise WheelError(f"{wheel.name} is not a wheel file name (name-version-python-abi-platform.whl)")
    name, _, python, _, platform = parts[0], parts[1], parts[-3], parts[-2], parts[-1]
    if name.lower().replace("-", "_") != "onnxruntime_gpu":
        raise WheelError(f"{wheel.name} is {name}, not onnxruntime_gpu: pass the GPU build's wheel")
    if python_tag not in python.split("."):
        raise WheelError(f"{wheel.name} is for {python}; the GPU machine runs Python 3.12: use a {python_tag} wheel")
    if "x86_64" not in platform or "linux" not in platform:
        raise WheelError(f"{wheel.name} is for {platform}; the GPU machine is x86-64 Linux: use a manylinux x86_64 wheel")
    major = wheel_cuda_major(wheel)
    if major is None:
        raise WheelError(f"{wheel.name} names no NVIDIA CUDA runtime in its metadata, so its CUDA version is unknown: "
                         f"use an onnxruntime-gpu release that does (1.19 and later)")
    if major != cuda_major:
        raise WheelError(f"{wheel.name} is built for CUDA {major}; the GPU image has CUDA {cuda_major}: pick the "
                         f"onnxruntime-gpu release built for CUDA {cuda_major} (its metadata requires "
                         f"nvidia-cuda-runtime~={cuda_major}.0)")
    return major


def download(version: str, into: Path) -> Path:
    """onnxruntime-gpu==version for CPython 3.12 on x86-64 Linux, from the package index this machine reaches."""
    into.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(into),
               f"onnxruntime-gpu=={version}"]
    subprocess.run(command, check=True)
    wheels = sorted(into.glob(f"onnxruntime_gpu-{version}-*.whl"))
    if not wheels:
        raise WheelError(f"pip saved no onnxruntime_gpu-{version} wheel into {into}")
    return wheels[-1]


def split(wheel: Path, out: Path, *, part_mib: int, cuda_major: int) -> dict:
    """Write wheel's bytes as out/part-00, part-01, ... of part_mib MiB at most, as few and as even as that
    allows (so no call carries a sliver), and out/manifest.json."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    size, parts = wheel.stat().st_size, []
    count = max(1, -(-size // (part_mib << 20)))
    limit = -(-size // count)
    with open(wheel, "rb") as f:
        for index in range(count):
            path = out / f"part-{index:02d}"
            path.write_bytes(f.read(limit))
            parts.append({"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)})
    manifest = {"wheel": wheel.name, "bytes": size, "sha256": sha256(wheel), "cuda_major": cuda_major,
                "parts": parts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def device_calls(manifest: dict, parts: Path, stage_command: str) -> list[dict]:
    """The device calls that bring the parts over, one a call, each within 30 s of the last: (command, carry).
    The last carries the manifest too and runs `stage_command`."""
    calls = [{"command": f"ls -l {parts}", "carry": [str(parts / p["file"])]} for p in manifest["parts"]]
    calls[-1] = {"command": stage_command, "carry": [*calls[-1]["carry"], str(parts / MANIFEST)]}
    return calls


def join(parts: Path, wheel_dir: Path) -> Path:
    """Check every part against the manifest and join them into the wheel (its own name) in wheel_dir."""
    manifest_path = parts / MANIFEST
    if not manifest_path.is_file():
        raise WheelError(f"{manifest_path} is missing: the last device call carries it with the last part; run "
                         "`python bench/gpu/ort_gpu_wheel.py prepare` here and send the calls it prints")
    manifest = json.loads(manifest_path.read_text())
    missing = [p["file"] for p in manifest["parts"] if not (parts / p["file"]).is_file()]
    if missing:
        raise WheelError(f"{', '.join(missing)} of {len(manifest['parts'])} parts missing in {parts}: the GPU machine "
                         "keeps them only while it stays up (about 30 s after a call); send the calls again, "
                         "one right after another")
    bad = [p["file"] for p in manifest["parts"]
           if (parts / p["file"]).stat().st_size != p["bytes"] or sha256(parts / p["file"]) != p["sha256"]]
    if bad:
        raise WheelError(f"{', '.join(bad)} in {parts} differ from the manifest (a stale part from another "
                         "prepare, or a broken transfer): send them again")
    wheel = wheel_dir / Path(manifest["wheel"]).name
    with open(wheel, "wb") as out:
        for p in manifest["parts"]:
            out.write((parts / p["file"]).read_bytes())
    if sha256(wheel) != manifest["sha256"]:
        raise WheelError(f"the joined {wheel.name} does not match the manifest's checksum: run prepare again")
    return wheel


def install(parts: Path, target: Path) -> Path:
    """Join, verify and install the wheel into `target` (no dependencies: the image's CPU onnxruntime brought
    them); put `target` first on PYTHONPATH to import it instead of the CPU build."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = join(parts, Path(tmp))
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(target), str(wheel)], check=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="on this machine: check and split the wheel")
    source = prepare.add_mutually_exclusive_group(required=True)
    source.add_argument("--wheel", type=Path, help="an onnxruntime-gpu wheel already here")
    source.add_argument("--version", help="download onnxruntime-gpu==VERSION for the GPU machine")
    prepare.add_argument("--out", type=Path, default=PARTS)
    prepare.add_argument("--part-mib", type=int, default=61,
                         help=f"MiB a part (a call carries {CALL_LIMIT_MIB} MiB with the working tree)")
    prepare.add_argument("--cuda-major", type=int, default=IMAGE_CUDA_MAJOR, help="the GPU image's CUDA major")
    prepare.add_argument("--stage", default='STAGES="ort_cuda ort_bench" bash bench/gpu_check.sh $OUT',
                         help="what the last call runs")
    setup = commands.add_parser("install", help="on the GPU machine: join, verify, install into --target")
    setup.add_argument("--parts", type=Path, default=PARTS)
    setup.add_argument("--target", type=Path, default=Path("/tmp/ort-gpu"))
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            print(install(args.parts, args.target))
            return
        if not 1 <= args.part_mib < CALL_LIMIT_MIB:
            raise WheelError(f"--part-mib must leave room for the working tree under {CALL_LIMIT_MIB} MiB, "
                             f"got {args.part_mib}")
        with tempfile.TemporaryDirectory() as tmp:
            wheel = args.wheel if args.wheel else download(args.version, Path(tmp))
            major = check_wheel(wheel, cuda_major=args.cuda_major)
            manifest = split(wheel, args.out, part_mib=args.part_mib, cuda_major=major)
    except WheelError as e:
        sys.exit(f"error: {e}")
    print(f"{manifest['wheel']} (CUDA {major}, {manifest['bytes'] / 1e6:.1f} MB) in {len(manifest['parts'])} parts "
          f"under {args.out}; device calls, each within 30 s of the last:")
    for call in device_calls(manifest, args.out, args.stage):
        print(json.dumps(call))


if __name__ == "__main__":
    main()
