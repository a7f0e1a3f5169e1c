"""Compile the fused update kernel ahead of time for a GPU architecture, on a machine without a GPU.

Triton's compiler and the ptxas it ships need no GPU: this lowers every variant of the kernel (storage dtype
x clamp x non-finite tracking) to PTX and machine code (cubin) for, say, Hopper (sm_90). CI uses it to check
what the interpreter cannot: that each variant compiles for the GPU, and that every access to the four
element tensors is a 128-bit vector access, which is what lets a memory-bound kernel approach copy bandwidth.

The signature mirrors Triton's own launch-time specialization for the engine's buffers: pointers 16-byte
aligned (every torch allocation is) and an element count divisible by 16 (any latent width divisible by 16,
as every preset's is). Run it with TRITON_INTERPRET unset: the interpreter replaces the language's
operations that the compiler needs.

    python -m ldlm.kernels.aot --arch 90            # a table of the variants' memory accesses
    python -m ldlm.kernels.aot --arch 90 --json     # the same as JSON
    python -m ldlm.kernels.aot --arch 90 --ptx DIR  # and each variant's PTX, to read
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

ELEMENT_TENSORS = ("x_ptr", "x0_ptr", "noise_ptr", "out_ptr")  # the storage dtype; everything else is fixed
FIXED_SIGNATURE = {
    "coef_x0_ptr": "*fp32", "coef_xt_ptr": "*fp32", "coef_noise_ptr": "*fp32",
    "step_ptr": "*i64", "first_bad_ptr": "*i64", "n_elements": "i32", "clamp_value": "fp32",
    "CLAMP": "constexpr", "TRACK_NONFINITE": "constexpr", "BLOCK_SIZE": "constexpr",
}
DTYPES = {"float32": ("fp32", 4), "bfloat16": ("bf16", 2), "float16": ("fp16", 2)}  # name: (Triton type, bytes)
ACCESS = re.compile(r"\b(ld\.global|st\.global|atom\.global)((?:\.\w+)*)")


@dataclass(frozen=True)
class Variant:
    dtype: str  # a key of DTYPES
    clamp: bool  # clamp x0_hat (the model was trained with clamping)
    track_nonfinite: bool  # record the first non-finite step in a device flag
    block_size: int = 1024  # elements per program, as ldlm.kernels.fused_update launches it


def all_variants(block_size: int = 1024) -> list[Variant]:
    return [Variant(d, c, t, block_size) for d, c, t in itertools.product(DTYPES, (False, True), (False, True))]


def _jit_function():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter replaces what the compiler needs; "
                           "run ahead-of-time compilation in a process without it")
    from .fused_update import _fused_update_kernel
    return _fused_update_kernel


def compile_variant(variant: Variant, arch: int):
    """The Triton CompiledKernel of one variant for CUDA compute capability `arch` (90: Hopper, 80: Ampere);
    its .asm holds 'ptx' and 'cubin'."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = _jit_function()
    element_type, _ = DTYPES[variant.dtype]
    signature = {name: f"*{element_type}" for name in ELEMENT_TENSORS} | FIXED_SIGNATURE
    if list(signature) != list(kernel.arg_names):
        raise RuntimeError(f"the kernel's arguments {kernel.arg_names} changed: update {__name__}.FIXED_SIGNATURE")
    aligned = [i for i, name in enumerate(kernel.arg_names) if signature[name].startswith("*") or name == "n_elements"]
    source = ASTSource(
        fn=kernel, signature=signature,
        constexprs={"CLAMP": variant.clamp, "TRACK_NONFINITE": variant.track_nonfinite,
                    "BLOCK_SIZE": variant.block_size},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32))


def memory_accesses(ptx: str) -> dict[str, int]:
    """Global memory instructions in PTX by kind: 'load', 'load.v4', 'store', 'store.v4', 'atomic'."""
    counts: collections.Counter[str] = collections.Counter()
    for op, modifiers in ACCESS.findall(ptx):
        kind = {"ld.global": "load", "st.global": "store", "atom.global": "atomic"}[op]
        counts[kind + (".v4" if ".v4" in modifiers and kind != "atomic" else "")] += 1
    return dict(counts)


def report(arch: int, block_size: int = 1024, ptx_dir: Path | None = None) -> list[dict]:
    rows = []
    for variant in all_variants(block_size):
        compiled = compile_variant(variant, arch)
        ptx = compiled.asm["ptx"]
        if ptx_dir is not None:
            ptx_dir.mkdir(parents=True, exist_ok=True)
            name = f"fused_update_sm{arch}_{variant.dtype}_clamp{int(variant.clamp)}_track{int(variant.track_nonfinite)}"
            (ptx_dir / f"{name}.ptx").write_text(ptx)
        rows.append({"arch": arch, "dtype": variant.dtype, "clamp": variant.clamp,
                     "track_nonfinite": variant.track_nonfinite, "block_size": block_size,
                     "num_warps": compiled.metadata.num_warps, "cubin_bytes": len(compiled.asm["cubin"]),
                     "accesses": memory_accesses(ptx)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--ptx", type=Path, help="also write each variant's PTX into this folder")
    args = parser.parse_args(argv)
    rows = report(args.arch, args.block_size, args.ptx)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"fused update for sm_{args.arch}, {args.block_size} elements per program: global memory instructions")
    print(f"{'dtype':>9} {'clamp':>5} {'track':>5} {'warps':>5} {'cubin B':>8}  accesses")
    for r in rows:
        accesses = ", ".join(f"{k} {v}" for k, v in sorted(r["accesses"].items()))
        print(f"{r['dtype']:>9} {r['clamp']!s:>5} {r['track_nonfinite']!s:>5} {r['num_warps']:>5} "
              f"{r['cubin_bytes']:>8}  {accesses}")


if __name__ == "__main__":
    main()
