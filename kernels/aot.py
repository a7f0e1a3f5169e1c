"""Compile the engine's Triton kernels ahead of time for a GPU architecture, on a machine without a GPU.

Triton's compiler and the ptxas it ships need no GPU: this lowers every variant of each kernel (storage dtype,
and the fused update's clamp, non-finite tracking and multistep history) to PTX and machine code (cubin) for,
say, Hopper (sm_90). CI uses it to check what the interpreter cannot: that each variant compiles for the GPU,
and that every access to the element tensors is a 128-bit vector access, which is what lets a memory-bound
kernel approach copy bandwidth.

The signatures mirror Triton's own launch-time specialization for the engine's buffers: pointers 16-byte
aligned (every torch allocation is) and widths divisible by 16 (every preset's latent width and model width
are; batch sizes are not assumed to be). Run it with TRITON_INTERPRET unset: the interpreter replaces the
language's operations that the compiler needs.

    python -m ldlm.kernels.aot --arch 90            # a table of the variants' memory accesses
    python -m ldlm.kernels.aot --arch 90 --json     # the same as JSON
    python -m ldlm.kernels.aot --arch 90 --ptx DIR  # and each variant's PTX, to read
"""

from __future__ import annotations

import argparse
import collections
import importlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch name: Triton type
ACCESS = re.compile(r"\b(ld\.global|st\.global|atom\.global|cp\.async\.c[ag]\.shared\.global)((?:\.\w+)*)")


@dataclass(frozen=True)
class KernelSpec:
    module: str  # in ldlm.kernels
    function: str  # the @triton.jit function
    signature: dict[str, str]  # argument: Triton type, "{dtype}" for the storage dtype's pointers
    divisible: tuple[str, ...]  # integer arguments divisible by 16 in every launch of the engine's (the widths)
    flags: tuple[str, ...] = ()  # boolean constexprs, compiled both ways
    constants: dict[str, int] = field(default_factory=dict)  # other constexprs, as the engine launches it on a GPU
    block_size: int = 1024  # BLOCK_SIZE as the engine launches it (base preset); 0: the kernel has none
    dtypes: tuple[str, ...] = tuple(DTYPES)  # the storage dtypes it is compiled for
    min_arch: int = 0  # the oldest compute capability it runs on (float8 e4m3 needs Ada/Hopper: 89)


def _fused_linear_spec(split_k: int = 1, conv1d: bool = False, fp8: bool = False) -> KernelSpec:
    """ldlm.kernels.fused_linear as the engine launches it: nn.Linear's weight layout (K contiguous) and the exact
    GELU, or (conv1d) GPT-2's Conv1D layout (N contiguous) and its tanh GELU; split over K or not; the weight in
    the activations' dtype, or (fp8) float8 e4m3 codes with a scale per column (bf16 and fp32 activations, for
    sm_89 and later). Triton specializes a stride of 1 as a constant, so the contiguous weight stride is one here."""
    out = "*{dtype}" if split_k == 1 else "*fp32"  # split-K adds its partial sums into an fp32 output
    unit, strided = ("stride_wn", "stride_wk") if conv1d else ("stride_wk", "stride_wn")
    return KernelSpec(
        "fused_linear", "_fused_linear_kernel",
        {"x_ptr": "*{dtype}", "w_ptr": "*fp8e4nv" if fp8 else "*{dtype}", "w_scale_ptr": "*fp32", "b_ptr": "*{dtype}", "ln_w_ptr": "*{dtype}", "ln_b_ptr": "*{dtype}",
         "res_ptr": "*{dtype}", "out_ptr": out, "M": "i32", "N": "i32", "K": "i32", "eps": "fp32", "stride_xm": "i32",
         **{name: "constexpr" if name == unit else "i32" for name in ("stride_wn", "stride_wk")},
         "stride_rm": "i32", "stride_om": "i32", "LN": "constexpr", "GELU": "constexpr", "TANH": "constexpr", "RESIDUAL": "constexpr", "SPLIT_K": "constexpr",
         "W_SCALE": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "DOT_FP32": "constexpr"},
        divisible=("N", "K", "stride_xm", strided, "stride_rm", "stride_om"),
        flags=("LN", "GELU", "RESIDUAL") if split_k == 1 else ("LN", "RESIDUAL"),
        constants={"SPLIT_K": split_k, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "DOT_FP32": False,
                   "TANH": conv1d, "W_SCALE": fp8, unit: 1, **({"GELU": False} if split_k > 1 else {})},
        block_size=0, **({"dtypes": ("bfloat16", "float32"), "min_arch": 89} if fp8 else {}),
    )


KERNELS = {
    "fused_update": KernelSpec(
        "fused_update", "_fused_update_kernel",
        {"x_ptr": "*{dtype}", "x0_ptr": "*{dtype}", "noise_ptr": "*{dtype}", "out_ptr": "*{dtype}",
         "history_ptr": "*{dtype}", "coef_x0_ptr": "*fp32", "coef_xt_ptr": "*fp32", "coef_noise_ptr": "*fp32",
         "coef_prev_ptr": "*fp32", "step_ptr": "*i64", "first_bad_ptr": "*i64", "n_elements": "i32",
         "clamp_value": "fp32", "CLAMP": "constexpr", "TRACK_NONFINITE": "constexpr", "HISTORY": "constexpr",
         "BLOCK_SIZE": "constexpr"},
        divisible=("n_elements",), flags=("CLAMP", "TRACK_NONFINITE", "HISTORY"),
    ),
    # one row per program, as on a GPU: the base preset's width, 768, in 1,024 lanes
    "add_layer_norm": KernelSpec(
        "add_layer_norm", "_add_layer_norm_kernel",
        {"h_ptr": "*{dtype}", "y_ptr": "*{dtype}", "weight_ptr": "*{dtype}", "bias_ptr": "*{dtype}",
         "out_ptr": "*{dtype}", "n_rows": "i32", "n_cols": "i32", "eps": "fp32", "ROWS": "constexpr",
         "BLOCK_SIZE": "constexpr"},
        divisible=("n_cols",), constants={"ROWS": 1},
    ),
    # the base preset's decode step: 12 heads of 64, 8 prefix positions + 64 tokens
    "beam_attention": KernelSpec(
        "beam_attention", "_beam_attention_kernel",
        {"q_ptr": "*{dtype}", "k_ptr": "*{dtype}", "v_ptr": "*{dtype}", "source_ptr": "*i64", "out_ptr": "*{dtype}",
         "position_ptr": "*i64", "scale": "fp32", "stride_qr": "i32", "stride_qh": "i32", "stride_or": "i32",
         "stride_oh": "i32", "N_HEADS": "constexpr", "MAX_LEN": "constexpr", "HEAD_DIM": "constexpr",
         "BLOCK_P": "constexpr"},
        divisible=("stride_qr", "stride_qh", "stride_or", "stride_oh"),
        constants={"N_HEADS": 12, "MAX_LEN": 72, "HEAD_DIM": 64, "BLOCK_P": 32}, block_size=0,
    ),
    # the engine's fused block matmuls (base: d_model 768, FFN 3072) as a GPU launches them: 16 rows x 64 columns
    # a program, K in steps of 64; unsplit, and split over K (partial sums added atomically in fp32)
    "fused_linear": _fused_linear_spec(split_k=1),
    "fused_linear_split": _fused_linear_spec(split_k=4),
    "fused_linear_gpt2": _fused_linear_spec(conv1d=True),  # the decode step's layers (GPT-2's Conv1D, gelu_new)
    "fused_linear_fp8": _fused_linear_spec(fp8=True),  # float8 e4m3 weights (ldlm.kernels.fused_linear.Fp8Linear)
    # the fused beam step (ldlm.kernels.beam_head) at the base preset's decode: 4 beams (8 candidates), GPT-2's
    # vocabulary (50,257: not a multiple of anything) in tiles of 128 tokens, 64 rows x 768 a program
    "beam_head_tiles": KernelSpec(
        "beam_head", "_head_tiles_kernel",
        {"h_ptr": "*{dtype}", "ln_w_ptr": "*{dtype}", "ln_b_ptr": "*{dtype}", "w_ptr": "*{dtype}", "banned_ptr": "*i32",
         "tile_max_ptr": "*fp32", "tile_sum_ptr": "*fp32", "cand_logit_ptr": "*fp32", "cand_token_ptr": "*i32",
         "R": "i32", "V": "i32", "E": "i32", "W": "i32", "n_tiles": "i32", "eps": "fp32", "stride_hr": "i32",
         "stride_wv": "i32", "C": "constexpr", "BLOCK_R": "constexpr", "BLOCK_V": "constexpr", "BLOCK_E": "constexpr",
         "DOT_FP32": "constexpr"},
        divisible=("E", "stride_hr", "stride_wv"),
        constants={"C": 8, "BLOCK_R": 64, "BLOCK_V": 128, "BLOCK_E": 64, "DOT_FP32": False}, block_size=0,
    ),
    "beam_topk": KernelSpec(  # fp32 scores whatever the model's dtype: one variant
        "beam_head", "_beam_topk_kernel",
        {"tile_max_ptr": "*fp32", "tile_sum_ptr": "*fp32", "cand_logit_ptr": "*fp32", "cand_token_ptr": "*i32",
         "running_ptr": "*fp32", "out_score_ptr": "*fp32", "out_index_ptr": "*i64", "V": "i32", "n_tiles": "i32",
         "K": "constexpr", "C": "constexpr", "BLOCK_K": "constexpr", "BLOCK_T": "constexpr", "BLOCK_N": "constexpr"},
        divisible=(), constants={"K": 4, "C": 8, "BLOCK_K": 4, "BLOCK_T": 128, "BLOCK_N": 256}, block_size=0,
        dtypes=("float32",),
    ),
}


@dataclass(frozen=True)
class Variant:
    kernel: str  # a key of KERNELS
    dtype: str  # a key of DTYPES
    flags: dict[str, bool] = field(default_factory=dict)  # the kernel's boolean constexprs


def all_variants(arch: int) -> list[Variant]:
    """Every variant of every kernel that runs on compute capability `arch`."""
    return [Variant(name, dtype, dict(zip(spec.flags, values)))
            for name, spec in KERNELS.items() if arch >= spec.min_arch for dtype in spec.dtypes
            for values in itertools.product((False, True), repeat=len(spec.flags))]


def _jit_function(spec: KernelSpec):
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1 is set: the interpreter replaces what the compiler needs; "
                           "run ahead-of-time compilation in a process without it")
    return getattr(importlib.import_module(f"{__package__}.{spec.module}"), spec.function)


def compile_variant(variant: Variant, arch: int):
    """The Triton CompiledKernel of one variant for CUDA compute capability `arch` (90: Hopper, 80: Ampere);
    its .asm holds 'ptx' and 'cubin'."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = KERNELS[variant.kernel]
    kernel = _jit_function(spec)
    signature = {name: kind.format(dtype=DTYPES[variant.dtype]) for name, kind in spec.signature.items()}
    if list(signature) != list(kernel.arg_names):
        raise RuntimeError(f"{spec.function}'s arguments {kernel.arg_names} changed: update {__name__}.KERNELS")
    aligned = [i for i, (name, kind) in enumerate(signature.items())
               if kind.startswith("*") or name in spec.divisible]
    constexprs = {**variant.flags, **spec.constants, **({"BLOCK_SIZE": spec.block_size} if spec.block_size else {})}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32))


def memory_accesses(ptx: str) -> dict[str, int]:
    """Global memory instructions in PTX by kind: 'load', 'load.v4', 'store', 'store.v4', 'atomic', and the
    asynchronous copies to shared memory that feed a tl.dot: 'async.v4' (cp.async.cg: 16 bytes) and 'async'."""
    counts: collections.Counter[str] = collections.Counter()
    for op, modifiers in ACCESS.findall(ptx):
        if op.startswith("cp.async"):
            counts["async.v4" if op.startswith("cp.async.cg") else "async"] += 1
            continue
        kind = {"ld.global": "load", "st.global": "store", "atom.global": "atomic"}[op]
        counts[kind + (".v4" if ".v4" in modifiers and kind != "atomic" else "")] += 1
    return dict(counts)


def report(arch: int, ptx_dir: Path | None = None) -> list[dict]:
    rows = []
    for variant in all_variants(arch):
        compiled = compile_variant(variant, arch)
        ptx = compiled.asm["ptx"]
        if ptx_dir is not None:
            ptx_dir.mkdir(parents=True, exist_ok=True)
            flags = "".join(f"_{k.lower()}{int(v)}" for k, v in variant.flags.items())
            (ptx_dir / f"{variant.kernel}_sm{arch}_{variant.dtype}{flags}.ptx").write_text(ptx)
        rows.append({"kernel": variant.kernel, "arch": arch, "dtype": variant.dtype, "flags": variant.flags,
                     "block_size": KERNELS[variant.kernel].block_size, "num_warps": compiled.metadata.num_warps,
                     "cubin_bytes": len(compiled.asm["cubin"]), "accesses": memory_accesses(ptx)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--ptx", type=Path, help="also write each variant's PTX into this folder")
    args = parser.parse_args(argv)
    rows = report(args.arch, args.ptx)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"Triton kernels for sm_{args.arch}: global memory instructions per thread")
    print(f"{'kernel':>15} {'dtype':>9} {'flags':>28} {'warps':>5} {'cubin B':>8}  accesses")
    for r in rows:
        flags = ", ".join(f"{k.lower()}={int(v)}" for k, v in r["flags"].items()) or "-"
        accesses = ", ".join(f"{k} {v}" for k, v in sorted(r["accesses"].items()))
        print(f"{r['kernel']:>15} {r['dtype']:>9} {flags:>28} {r['num_warps']:>5} {r['cubin_bytes']:>8}  {accesses}")


if __name__ == "__main__":
    main()
