"""The `aoti` backend's graphs: AOTInductor packages written by `ldlm export --format aoti`, run in this process
with nothing compiled at load (the kernels are a shared library inside each package).

An AotiGraph has the interface of ldlm.runtimes.onnx_runtime.Graph (run(inputs, outputs) on torch tensors, the shapes
the loader checks), so the onnx backend's encoder, reverse transformer, decoder and beam search drive it
unchanged (ldlm.runtimes.onnx_runtime.load_export_components).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ldlm.export.manifest import AOTI_IO_METADATA as IO_METADATA
from ldlm.runtimes.backends import BackendUnavailable
from ldlm.runtimes.graph_io import ELEMENT_TYPES, GraphShapes

_DTYPES = {name: dtype for dtype, name in ELEMENT_TYPES.items()}
_ISA_LEVEL = {"DEFAULT": 0, "NO AVX": 0, "ZVECTOR": 0, "VSX": 0, "SVE256": 0, "AVX2": 1, "AVX512": 2}


def check_target(manifest: dict, directory: Path, device: torch.device) -> str:
    """Refuse, before opening a package, an export this process cannot run: another torch (AOTInductor's
    runtime ABI), another device, or a CPU without the instruction set its kernels were built for. Returns a
    line for the backend's reason."""
    from ldlm.export.manifest import ExportError

    versions = manifest.get("versions")
    built_with = versions.get("torch") if isinstance(versions, dict) else None
    if built_with != torch.__version__:
        raise ExportError(f"{directory} was compiled by torch {built_with}; this is torch {torch.__version__}, whose "
                          "AOTInductor runtime may not load it: export the checkpoint again here with "
                          "`ldlm export CKPT OUT --format aoti`")
    target = manifest.get("target")
    if not isinstance(target, dict) or target.get("device") != "cpu":
        raise ExportError(f"{directory / 'manifest.json'} names no CPU target (\"target\": {target!r}): re-run "
                          "`ldlm export --format aoti`")
    if device.type != "cpu":
        raise BackendUnavailable(f"{directory} holds AOTInductor packages compiled for the CPU: load it with "
                                 f"device='cpu', not {device}, or export the checkpoint in another format")
    built, here = target.get("cpu_isa"), torch.backends.cpu.get_cpu_capability()
    if _ISA_LEVEL.get(built, 3) > _ISA_LEVEL.get(here, 0):
        raise BackendUnavailable(f"{directory}'s kernels were compiled for {built} instructions, which this CPU "
                                 f"lacks (it has {here}): export the checkpoint again on this machine with "
                                 "`ldlm export CKPT OUT --format aoti`")
    return f"AOTInductor packages (compiled ahead of time for {built}; nothing compiles at load)"


class NativeCodeRefused(ValueError):
    """An export holding native code that nothing shows this user wrote, loaded without trust_native_code."""


def native_code_consent(manifest: dict, directory: Path, trust_native_code: bool) -> str:
    """Why this process may run the export's native code, checked before any package is opened: the caller's
    consent, or this user's signature over the manifest (whose hashes read_manifest has checked against every
    file). Raises NativeCodeRefused, naming the safe alternatives, otherwise."""
    from ldlm.export.manifest import signed_by_this_user

    if trust_native_code:
        return "native code run by consent (trust_native_code)"
    if signed_by_this_user(manifest):
        return "native code exported by this user here (signed with this user's key)"
    raise NativeCodeRefused(
        f"{directory} holds AOTInductor packages, which are native code (a shared library each) that runs when "
        "loaded, and nothing shows that you exported it on this machine (its manifest carries no signature of "
        "your ldlm key). Load it only if you trust whoever wrote it: ldlm.load(path, trust_native_code=True), or "
        "--trust-native-code. Safe alternatives: the ONNX export, which is data (`ldlm export CKPT OUT`), or export "
        "the checkpoint again here (`ldlm export CKPT OUT --format aoti`)")


def _private_copy(path: Path, expected_sha256: str, folder: Path) -> Path:
    """A copy of `path` in a folder only this process's user can write, hashed as it is written and checked
    against the manifest's hash: what is loaded is what was verified, whoever can write the export's folder."""
    copy, digest = folder / path.name, hashlib.sha256()
    with path.open("rb") as source, copy.open("wb") as target:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
            target.write(chunk)
    if digest.hexdigest() != expected_sha256:
        raise ValueError(f"{path} changed while it was being loaded (its hash no longer matches manifest.json); "
                         "load it again, from a folder no one else writes")
    return copy


class AotiGraph(GraphShapes):
    """One AOTInductor package; `spec` is its manifest entry, checked against the package's own metadata."""

    def __init__(self, path: Path, spec: dict, sha256: str):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the export is incomplete; re-run `ldlm export --format aoti`")
        with tempfile.TemporaryDirectory(prefix="ldlm-aoti-") as private:  # mode 700
            self.runner, io = self._load(path, _private_copy(path, sha256, Path(private)))
        self.path = path
        self.input_names = [i["name"] for i in io["inputs"]]
        self.output_names = [o["name"] for o in io["outputs"]]
        expected = ([i["name"] for i in spec["inputs"]], [o["name"] for o in spec["outputs"]])
        if expected != (self.input_names, self.output_names):
            raise ValueError(f"{path} does not match manifest.json: the package has inputs/outputs "
                             f"{(self.input_names, self.output_names)}, the manifest lists {expected}; re-run "
                             "`ldlm export --format aoti` (a package was replaced)")
        self.input_dtypes = {i["name"]: _DTYPES[i["dtype"]] for i in io["inputs"]}
        self.shapes = {v["name"]: v["shape"] for v in (*io["inputs"], *io["outputs"])}

    @staticmethod
    def _load(path: Path, copy: Path) -> tuple[object, dict]:
        """The package's runner and the inputs and outputs its metadata lists."""
        try:
            runner = torch._inductor.aoti_load_package(str(copy))
            return runner, json.loads(runner.get_metadata()[IO_METADATA])
        except Exception as e:  # the loader raises RuntimeError, zipfile's errors, KeyError for foreign packages
            raise ValueError(f"{path} could not be loaded as an ldlm AOTInductor package ({type(e).__name__}: {e}): "
                             "it is corrupt or not written by `ldlm export --format aoti`; re-run it") from e

    def bind(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> Callable[[], None]:
        """As Graph.bind: a run with these tensors, each call reading what they hold then (a package takes its
        inputs per call, so nothing is bound ahead)."""
        return lambda: self.run(inputs, outputs)

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run with `inputs`, writing the outputs named in `outputs` into those tensors (the package returns its
        own; one copy each, no broadcasting)."""
        with torch.no_grad():
            results = self.runner(*(inputs[name].contiguous() for name in self.input_names))
        results = dict(zip(self.output_names, results if isinstance(results, (tuple, list)) else [results]))
        for name, target in outputs.items():
            if results[name].shape != target.shape:
                raise ValueError(f"{self.path.name} returned {name} of shape {tuple(results[name].shape)}, the "
                                 f"caller expected {tuple(target.shape)}")
            target.copy_(results[name])
