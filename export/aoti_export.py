"""`ldlm export --format aoti`: a checkpoint -> AOTInductor packages of its graphs + the same manifest.

The graphs are the ONNX export's (export/graphs.py, the same example inputs and dynamic axes), traced by
torch.export and compiled ahead of time by Inductor (`torch._inductor.aoti_compile_and_package`) into `.pt2`
packages: generated C++ kernels built into a shared library, with the weights inside. Loading one
(ldlm.runtimes.aoti_runtime) compiles nothing. The manifest is the ONNX export's, with "format": "ldlm-aoti", every
file's hash, and what a package is bound to: the torch version that built it (AOTInductor's runtime ABI), the
device, and on the CPU the vector instruction set its kernels use (a package built for AVX-512 does not run on
a CPU without it).

Each package also carries its own inputs' and outputs' names, types and shapes in its metadata, so the loader
checks the manifest against the package itself, as the ONNX loader checks it against the graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ldlm.model.checkpoint import Components, load_checkpoint

from .manifest import AOTI_IO_METADATA, write_manifest
from .onnx_export import (check_target, graph_names, model_fields, quiet_exporter, save_tokenizers, traceable, versions,
                          write_atomically)


def _describe(name: str, value) -> dict:
    """One input or output of a traced program: name, element type, shape (sizes as ints, dynamic axes as the
    symbol torch.export gave them)."""
    shape = [int(d) if isinstance(d, int) else str(d) for d in value.shape]
    return {"name": name, "dtype": str(value.dtype).removeprefix("torch."), "shape": shape}


def program_io(program: torch.export.ExportedProgram, input_names, output_names) -> dict[str, list[dict]]:
    nodes = {node.name: node for node in program.graph.nodes}
    signature = program.graph_signature
    inputs = [_describe(n, nodes[p].meta["val"]) for n, p in zip(input_names, signature.user_inputs)]
    returned = next(node for node in program.graph.nodes if node.op == "output").args[0]
    outputs = [_describe(n, node.meta["val"]) for n, node in zip(output_names, returned)]
    return {"inputs": inputs, "outputs": outputs}


def compile_graph(components: Components, name: str, path: Path) -> dict:
    """Trace graph `name` of `components` with torch.export and compile it into the AOTInductor package `path`."""
    t = traceable(components, name)
    with quiet_exporter(), torch.no_grad():
        program = torch.export.export(t.module, tuple(t.inputs.values()), dynamic_shapes=t.dynamic_shapes)
        io = program_io(program, list(t.inputs), list(t.outputs))
        # dynamic threads: the kernels' OpenMP loops take the running process's thread count (torch.set_num_threads,
        # OMP_NUM_THREADS), not the count of the process that compiled them (Inductor's default)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs={
            "aot_inductor.metadata": {AOTI_IO_METADATA: json.dumps(io)}, "cpp.dynamic_threads": True})
    return {"file": path.name, **io}


def export_aoti(checkpoint: str | Path | Components, out: str | Path, *, overwrite: bool = False, log=print) -> Path:
    """Write AOTInductor packages of the graphs of `checkpoint` (float32, for the CPU) and their manifest into
    `out`, under the same rules as the ONNX export (a new or empty directory, or overwrite=True).

    The packages are native code (a shared library each). The manifest is signed with this user's key
    (ldlm.paths.signing_key), so that this user's ldlm loads them without asking; anyone else's needs
    trust_native_code=True."""
    from ldlm.paths import private_inductor_cache

    out = Path(out)
    check_target(out, overwrite)
    components = checkpoint if isinstance(checkpoint, Components) else load_checkpoint(checkpoint)
    log(private_inductor_cache())  # what it compiles is cached there and built into the packages

    def write(staging: Path) -> None:
        save_tokenizers(components, staging)
        graphs = {}
        for name in graph_names(components):
            path = staging / f"{name}.pt2"
            graphs[name] = compile_graph(components, name, path)
            log(f"compiled {name} -> {path.name} ({path.stat().st_size / 2**20:.1f} MiB)")
        write_manifest(staging, {
            "exporter": "torch._inductor.aoti_compile_and_package",
            "versions": versions(),
            # the vector instructions Inductor generates kernels for here (torch's CPU dispatch level)
            "target": {"device": "cpu", "cpu_isa": torch.backends.cpu.get_cpu_capability()},
            **model_fields(components),
            "graphs": {"float32": graphs},
        }, graph_format="aoti", sign=True)  # native code: signed, so that this user may load it without consent

    write_atomically(out, write)
    log(f"wrote {out / 'manifest.json'}")
    return out
