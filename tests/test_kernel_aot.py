"""The engine's Triton kernels (the fused update, the fused residual add + layer norm, the beam-indirect
attention, the fused linear layers) compiled for real GPUs, without one: Triton's compiler and its bundled
ptxas lower every variant to machine code for Ampere (sm_80) and Hopper (sm_90; with it the float8-weight
matmuls, which Ampere lacks). The interpreter that runs the kernel tests on CPU never compiles, so this is where a
construct the GPU compiler rejects would show; and the PTX says whether each access to the element tensors is
a 128-bit vector access, which a memory-bound kernel needs to approach copy bandwidth (the bandwidth itself is
measured on the GPU by bench/gpu/kernel_bandwidth.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


ARCHS = (80, 90)


@pytest.fixture(scope="module")
def compiled_rows():
    """Each architecture's variants, compiled by two processes at once (each compiles on one core)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter cannot compile
    runs = {arch: subprocess.Popen([sys.executable, "-m", "ldlm.kernels.aot", "--arch", str(arch), "--json"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for arch in ARCHS}
    results = {}
    for arch, run in runs.items():
        stdout, stderr = run.communicate(timeout=900)
        results[arch] = (run.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_compiles_with_128_bit_accesses(compiled_rows, arch):
    code, stdout, stderr = compiled_rows[arch]
    assert code == 0, stderr[-3000:]
    rows = json.loads(stdout)
    assert [r["kernel"] for r in rows].count("fused_update") == 24  # 3 dtypes x clamp x tracking x history
    assert [r["kernel"] for r in rows].count("add_layer_norm") == 3
    assert [r["kernel"] for r in rows].count("beam_attention") == 3
    assert [r["kernel"] for r in rows].count("fused_linear") == 24  # 3 dtypes x norm x GELU x residual
    assert [r["kernel"] for r in rows].count("fused_linear_split") == 12  # GELU runs unsplit
    assert [r["kernel"] for r in rows].count("fused_linear_gpt2") == 24  # GPT-2's Conv1D layout, tanh GELU
    # float8 e4m3 weights (bf16 and fp32 activations x norm x GELU x residual): Ada and Hopper only
    assert [r["kernel"] for r in rows].count("fused_linear_fp8") == (16 if arch >= 89 else 0)
    assert [r["kernel"] for r in rows].count("beam_head_tiles") == 3  # the fused beam step's LM head tiles
    assert [r["kernel"] for r in rows].count("beam_topk") == 1  # ...and its per-item top-2K, fp32 only
    for row in rows:
        assert row["cubin_bytes"] > 0, row
        bytes_per_element = 4 if row["dtype"] == "float32" else 2
        threads = row["num_warps"] * 32
        vectors = row["block_size"] // threads * bytes_per_element // 16  # 16-byte accesses per thread per tensor
        if row["kernel"] == "fused_update":
            history = row["flags"]["HISTORY"]  # a multistep solver: one more coefficient, x0_prev read, x0_hat kept
            expected = {
                "load": 5 if history else 4,  # the coefficients and the step counter, one scalar each
                "load.v4": (4 if history else 3) * vectors,  # x_t, x0_hat, noise (and x0_prev)
                "store.v4": (2 if history else 1) * vectors,  # x_next (and x0_hat into the history)
                **({"atomic": 1} if row["flags"]["TRACK_NONFINITE"] else {}),  # the first-bad-step flag
            }
        elif row["kernel"].startswith("fused_linear"):
            # the tiles of x and W reach the tensor cores (or FMAs, fp32) through 16-byte asynchronous copies; the
            # output is stored in 128-bit vectors, or added in fp32 atomically when split over K
            a = row["accesses"]
            assert a.get("async.v4", 0) >= 2, row
            split = row["kernel"] == "fused_linear_split"
            assert (a.get("atomic", 0) > 0, a.get("store.v4", 0) > 0) == (split, not split), row
            assert (a.get("load.v4", 0) > 0) == (row["flags"]["LN"] or row["flags"]["RESIDUAL"]), row
            continue
        elif row["kernel"].startswith("beam_"):
            # the LM head's tiles of h and W reach the tensor cores through 16-byte asynchronous copies; the
            # top-2K reads the candidates in 128-bit vectors
            a = row["accesses"]
            assert a.get("async.v4" if row["kernel"] == "beam_head_tiles" else "load.v4", 0) >= 2, row
            continue
        elif row["kernel"] == "add_layer_norm":
            expected = {"load.v4": 4 * vectors, "store.v4": 2 * vectors}  # h, y, weight, bias; h and the norm
        else:  # beam_attention: a block of 32 positions x 64 dims of keys and of values a loop, the query once
            tile = 32 * 64 // threads * bytes_per_element // 16
            assert row["accesses"]["load.v4"] == 2 * tile + 1, row  # the gathered rows: 128-bit accesses
            continue
        assert row["accesses"] == expected, row


def test_refuses_to_compile_under_the_interpreter(monkeypatch):
    from ldlm.kernels import aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    flags = {"CLAMP": False, "TRACK_NONFINITE": False, "HISTORY": False}
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_variant(aot.Variant("fused_update", "float32", flags), 90)
