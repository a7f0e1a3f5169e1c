"""Backend selection: which implementation of the sampling loop and the beam decode a pipeline runs.

    reference   plain PyTorch (ldlm.sampling.samplers, ldlm.sampling.beam_search): the oracle every fast path is checked against
    fused       the engine's code path without graphs: fused Triton update on static buffers, static-KV beam
                search; runs anywhere Triton runs (on CPU through TRITON_INTERPRET=1), for debugging and tests
    cuda-graph  the engine on CUDA: the same, with the sampling steps and the decode step captured as graphs
    compiled    the reference modules through torch.compile (Inductor, CPU or CUDA; ldlm.fast.compiled): the reference
                samplers with a compiled reverse transformer, the static-KV beam search with a compiled step
    onnx        the networks exported by `ldlm export`, run by ONNX Runtime from the export directory alone
                (ldlm.runtimes.onnx_runtime); the sampling and beam-search arithmetic is the reference's
    aoti        the same graphs compiled ahead of time by `ldlm export --format aoti` (AOTInductor packages,
                ldlm.runtimes.aoti_runtime), run like onnx's; nothing compiles at load
    auto        the export's own backend for an export directory; for a checkpoint, cuda-graph where CUDA and
                Triton are available, else reference
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a backend is resolved, so that the CLI's parser needs none
    import torch

BACKENDS = ("auto", "reference", "fused", "cuda-graph", "compiled", "onnx", "aoti")
EXPORT_BACKENDS = ("onnx", "aoti")  # run an export directory's graphs (the manifest's format says which)
ENGINE_BACKENDS = ("fused", "cuda-graph")  # the Triton/CUDA-graph engine (ldlm.fast.fused_sampler, static beam search)
STATIC_DECODE_BACKENDS = (*ENGINE_BACKENDS, "compiled")  # decode with the static-KV beam search


# Measured on the 2-core CPU with every path side by side (bench/cpu/cpu_paths.py; bench/RESULTS.md, "every CPU
# path"), end to end at 2 threads, batch 1 / 8 / 64: reference 648 / 1,105 / 7,488 ms, compiled 508 / 1,800 /
# 19,474 ms (and 26-41 s to compile its decode), aoti 309 / 872 / 4,697 ms, onnx --int8 286 / 817 / 5,106 ms.
# Of the backends that run a checkpoint the reference is the one that never loses much and compiles nothing;
# the exports are faster at every batch, so auto names them.
CPU_AUTO_REASON = ("auto: on the CPU, the reference for a checkpoint (compiles nothing; CUDA graphs need CUDA); an "
                   "export runs faster: "
                   "`ldlm export CKPT OUT` (--int8) or `--format aoti`, timed per machine in bench/RESULTS.md")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and what to use instead."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(name: str, device: torch.device, export: str | None = None) -> tuple[str, str]:
    """(backend, why) for a requested name on a device, for a checkpoint or an export directory whose graphs
    are in format `export` ("onnx" or "aoti"); raises with what to do when it cannot run."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKENDS)}")
    if export:
        if name not in ("auto", export):
            raise BackendUnavailable(f"this is an export directory of {export} graphs, which only backend {export!r} "
                                     f"runs; load the checkpoint it was exported from for backend {name!r}")
        return export, "requested" if name == export else f"auto: an export directory of {export} graphs"
    if name in EXPORT_BACKENDS:
        flag = " --format aoti" if name == "aoti" else ""
        raise BackendUnavailable(f"backend {name!r} runs an export directory: write one with "
                                 f"`ldlm export CHECKPOINT OUTDIR{flag}` and load that")
    if name == "auto":
        if device.type == "cpu":
            return "reference", CPU_AUTO_REASON
        if device.type != "cuda":
            return "reference", f"auto: device is {device.type}, CUDA graphs need a CUDA device"
        if not triton_available():
            return "reference", "auto: triton is not installed (pip install triton)"
        return "cuda-graph", "auto: CUDA device and triton available"
    if name == "compiled" and device.type == "cpu":
        from ldlm.fast.compiled import compiler_missing

        missing = compiler_missing()
        if missing:
            raise BackendUnavailable(f"backend 'compiled' on CPU needs Inductor's C++ toolchain: {missing}; install "
                                     "one (apt install g++), or use backend='reference'")
    if name in ("fused", "cuda-graph") and not triton_available():
        raise BackendUnavailable(f"backend {name!r} needs triton: pip install triton, or use backend='reference'")
    if name == "cuda-graph" and device.type != "cuda":
        import torch

        why = "torch.cuda.is_available() is False" if not torch.cuda.is_available() else f"device is {device}"
        raise BackendUnavailable(f"backend 'cuda-graph' needs a CUDA device ({why}): pass device='cuda', "
                           "or use backend='reference' or 'fused'")
    if name == "fused" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads the variable once, when it is first imported (often already done by torch's imports)
        raise BackendUnavailable("backend 'fused' on CPU runs Triton's interpreter: start Python with "
                                 "TRITON_INTERPRET=1 in the environment, or use backend='reference'")
    return name, "requested"
