"""The GPU benchmark scripts of bench/gpu_check.sh, run small on the CPU (Triton's interpreter), so a Python error
in them shows up here and not first on the rented GPU (their figures are only meaningful on the GPU); and the
kernel counts of an engine step and a decoded token (ldlm.fast.launches, printed by bench/gpu/step_kernels.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ldlm.fast.launches import decode_kernels, step_kernels
from ldlm.jobs.benchmark import bench_components
from ldlm.model.config import ModelConfig

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_latency_bench_records_parity_and_the_table_shows_it(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCH / "gpu" / "latency.py"), "--preset", "tiny", "--device", "cpu", "--engine-backend", "fused",
         "--batch-sizes", "1", "64", "--sampler", "ddim", "--steps", "3", "--max-new-tokens", "4", "--repeats", "1",
         "--json", str(tmp_path / "latency.json")],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "latency.json").read_text())
    assert report["engine_backend"] == "fused" and [row["batch"] for row in report["rows"]] == [1, 64]
    decoder = bench_components("tiny").decoder.eval()
    assert report["launches"] == {"sampling_step": sum(step_kernels("tiny", 1).values()),
                                  "decode_token": sum(decode_kernels(decoder, 1).values())}
    for row in report["rows"]:
        assert row["parity"]["max_rel_err"] < 1e-5 and row["parity"]["text_identical"]
        assert row["per_step"]["floor_us"] > 0 and row["speedup_sample"] > 0 and row["speedup_decode_vs_hf"] > 0
        assert 0 < row["decode_per_token"]["floor_us"] and row["decode_per_token"]["engine_gbs"] > 0
    table = subprocess.run([sys.executable, str(BENCH / "gpu" / "gpu_table.py"), str(tmp_path)], capture_output=True, text=True,
                           timeout=60).stdout
    assert "| batch 64: engine vs reference, same seed, fp32 | latents within" in table
    assert "text identical | <= 1e-5, identical |" in table
    assert ") vs floor" in table.split("| batch 64: beam decode, 4 beams, 4 tokens |")[1].splitlines()[0]
    assert "| batch 1: sampling loop, DDIM 3 steps |" in table
    for line in ("| batch 1: sampling loop", "| batch 1: beam decode"):  # the time per kernel, for the bound
        assert f"{report['launches']['sampling_step' if 'loop' in line else 'decode_token']} kernels = " in \
            table.split(line)[1].splitlines()[0]


def test_fused_blocks_bench_records_parity_beside_the_compiled_peer(tmp_path):
    """bench/gpu/fused_blocks.py (issue 21's stage) small on the CPU: the engine, the engine with fused blocks and
    torch.compile of the reference, each with its latents against the reference's; the table shows each."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCH / "gpu" / "fused_blocks.py"), "--preset", "tiny", "--device", "cpu", "--batch-sizes", "3",
         "--dtypes", "float32", "--sampler", "ddim", "--steps", "3", "--compile-modes", "default", "--repeats", "1",
         "--fp8", "--decode", "--decode-peers", "--max-new-tokens", "6", "--json", str(tmp_path / "blocks.json")],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "blocks.json").read_text())
    assert [r["path"] for r in report["rows"]] == ["engine", "engine + fused blocks", "engine + fused blocks + fp8",
                                                  "torch.compile default", "decode engine",
                                                  "decode engine + fused blocks",
                                                  "decode engine + fused blocks + fused beam step",
                                                  "decode HF generate", "decode HF generate, static cache"]
    for row in report["rows"]:
        assert row["batch"] == 3 and row["median_ms"] > 0, row
        if row["path"].endswith("fp8"):  # float8 codes: near the reference, not at it
            assert 1e-4 < row["max_rel_err"] < 0.1, row
        else:
            assert row["tokens_identical"] if "decode" in row["path"] else row["max_rel_err"] < 1e-5, row
    kernels = report["kernels_per_step"]
    assert kernels["engine + fused blocks"] < kernels["engine"] == sum(step_kernels("tiny", 1).values())
    fused, fp8 = (r for r in report["rows"] if r["path"].startswith("engine + fused"))
    assert fp8["weights_gbs"] * fp8["step_us"] < fused["weights_gbs"] * fused["step_us"]  # fewer bytes a step
    table = subprocess.run([sys.executable, str(BENCH / "gpu" / "gpu_table.py"), str(tmp_path)], capture_output=True,
                           text=True, check=True).stdout
    assert table.count("| sampling loop, ") == 4 and "torch.compile default" in table
    assert "x the fused blocks' time" in table.split("engine + fused blocks + fp8")[1].splitlines()[0]
    assert table.count("| decode engine") == 3 and table.count("| decode HF generate") == 2
    assert "DIFFER" not in table  # Hugging Face's tokens are the reference's too


def test_profile_runs_every_attention_and_the_table_shows_them(tmp_path):
    """bench/gpu/gpu_profile.py on the CPU (ops stand in for kernels): a step and a decoded token with each attention."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCH / "gpu" / "gpu_profile.py"), "--preset", "tiny", "--device", "cpu", "--batch-sizes", "2",
         "--json", str(tmp_path / "profile.json")], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "profile.json").read_text())
    assert [(r["what"], r.get("attention")) for r in report["rows"]] == [
        ("step", None), ("decode_token", "sdpa"), ("decode_token", "matmul"), ("decode_token", "indirect")]
    assert all(r["total_us"] > 0 and r["kernels"] > 0 and r["top"] for r in report["rows"])
    assert len(report["matmul"]) == 3 and all(m["tflops"] > 0 for m in report["matmul"])
    table = subprocess.run([sys.executable, str(BENCH / "gpu" / "gpu_table.py"), str(tmp_path)], capture_output=True, text=True,
                           timeout=60).stdout
    assert "| profile, batch 2 decode_token (fp32, matmul attention) |" in table
    assert "| profile, batch 2 decode_token (fp32, indirect attention) |" in table


def test_profile_counts_attention_kernels_apart_from_matmuls():
    """CUTLASS's and cuDNN's attention kernels carry "cutlass" or "sm80_" in their names, as matmuls do."""
    from torch.autograd import DeviceType

    sys.path.insert(0, str(BENCH / "gpu"))
    try:
        from gpu_profile import kernel_times
    finally:
        sys.path.remove(str(BENCH / "gpu"))

    class Kernel:
        device_type = DeviceType.CUDA

        def __init__(self, name, us):
            self.name, self.us = name, us
            self.time_range = self

        def elapsed_us(self):
            return self.us

    names = {"fmha_cutlassF_f32_aligned_64x64_rf_sm80": 210.0, "cudnn_generated_fort_native_sdpa_sm80_flash": 64.0,
             "sm80_xmma_gemm_f32f32_f32f32_f32_nn": 47.0, "nvjet_sm90_tst_64x8": 5.0, "_add_layer_norm_kernel": 2.0}
    times = kernel_times([Kernel(n, us) for n, us in names.items()] * 2, calls=2)
    assert times["total_us"] == 328.0 and times["matmul_us"] == 52.0 and times["kernels"] == 5
    assert times["top"][0] == {"name": "fmha_cutlassF_f32_aligned_64x64_rf_sm80", "us": 210.0, "launches": 1.0}


def test_the_table_reports_pytest_summaries_of_both_test_stages(tmp_path):
    # gpu_check.sh appends training's log to the GPU tests' (the device tool brings back eight files)
    (tmp_path / "tests.log").write_text("....\n1 failed, 40 passed in 61.2s\ntests exit 1\n== training\n"
                                        "..\n7 passed, 4 deselected in 20.5s\ntraining exit 0\n")
    table = subprocess.run([sys.executable, str(BENCH / "gpu" / "gpu_table.py"), str(tmp_path)], capture_output=True, text=True,
                           timeout=60).stdout
    assert "| GPU tests (parity, graphs) | 1 failed, 40 passed in 61.2s | all pass |" in table
    assert "| training on CUDA (tests/test_training.py) | 7 passed, 4 deselected in 20.5s | all pass |" in table


def test_the_table_reports_each_update_kernels_bandwidth_at_its_largest_size(tmp_path):
    """Small sizes time a launch, not memory (on the H200 a 64 x 768 update took 40 us eagerly, "113% of copy")."""
    def row(update, share, shape):
        return {"update": update, "dtype": "float32", "shape": shape, "kernel_gbs": 4000 * share, "copy_gbs": 4000,
                "kernel_us": 1.0, "share_of_copy": share}

    rows = [row("ddpm", 1.13, [64, 768]), row("ddpm", 0.81, [65536, 768]), row("dpm++2m", 0.9, [262144, 768])]
    (tmp_path / "kernel.json").write_text(json.dumps({"device": "test", "rows": rows}))
    table = subprocess.run([sys.executable, str(BENCH / "gpu" / "gpu_table.py"), str(tmp_path)], capture_output=True, text=True,
                           timeout=60).stdout
    assert ("| fused kernel bandwidth (ddpm update, float32, [65536, 768]) | 3240 GB/s = 81% of copy "
            "| >= 70% of copy |") in table
    assert "| fused kernel bandwidth (dpm++2m update, float32, [262144, 768]) | 3600 GB/s = 90% of copy" in table
    assert "[64, 768]" not in table


def test_an_engine_step_launches_only_the_model_and_one_update():
    """bench/gpu/step_kernels.py's count: with one latent token, a step is the model's matmuls (the input projection
    with its step's bias, per block the folded value-output projection and the MLP's two, the output
    projection), the first layer norm, each residual add fused with the norm after it, the GELUs, the step
    bias's one gather, the noise draw, the step counter and the fused update; no attention kernels, no time
    embedding, no concatenation, no separate adds or finiteness check, no host synchronization."""
    ops = step_kernels("tiny", 8)
    removed = {"sin", "cos", "exp", "cat", "add", "isfinite", "all", "where", "abs", "eq", "ne",
               "_local_scalar_dense", "item"}
    assert not removed & set(ops) and not [op for op in ops if "attention" in op], ops
    L = ModelConfig.from_preset("tiny").n_layers
    assert ops["addmm"] == 2 + 3 * L and ops["add_layer_norm (Triton)"] == 2 * L and ops["native_layer_norm"] == 1
    assert ops["fused_update (Triton)"] == 1 and ops["normal_"] == 1, ops
    assert sum(ops.values()) == (2 + 3 * L) + (2 * L + 1) + L + 4, ops  # matmuls, norms, GELUs, 4 more


def test_fused_blocks_make_a_step_one_kernel_per_matmul():
    """With ldlm.kernels.fused_linear each matmul carries its layer norm, bias, GELU and residual: a one-token
    step is three launches a block and one for the final norm and projection, beside the input projection, the
    step bias's gather, the noise draw, the step counter and the update."""
    L = ModelConfig.from_preset("tiny").n_layers
    ops = step_kernels("tiny", 8, fused_blocks=True)
    assert ops["fused_linear (Triton)"] == 3 * L + 1 and ops["addmm"] == 1, ops
    assert not {"gelu", "native_layer_norm", "add_layer_norm (Triton)"} & set(ops), ops
    assert sum(ops.values()) == (3 * L + 1) + 5, ops
    assert sum(ops.values()) < sum(step_kernels("tiny", 8).values())


def test_fused_blocks_make_a_decode_token_four_matmul_kernels_a_layer():
    """With ldlm.kernels.fused_linear a GPT-2 layer's step is its four matmuls (each with its norm, bias, GELU or
    residual) beside the cache writes and attention: three kernels a layer fewer than the fused norms' seven."""
    decoder = bench_components("tiny").decoder.eval()
    L = decoder.gpt2.config.n_layer
    fused, plain = decode_kernels(decoder, 1, fused_blocks=True), decode_kernels(decoder, 1)
    assert fused["fused_linear (Triton)"] == 4 * L and not {"addmm", "gelu", "add_layer_norm (Triton)"} & set(fused)
    assert sum(fused.values()) == sum(plain.values()) - 3 * L, (fused, plain)


def test_the_fused_beam_step_takes_the_lm_head_to_the_top_k_in_two_kernels():
    """ldlm.kernels.beam_head: ln_f, the LM head, log-softmax, the ban's (R, V) scatter and mask, the scores' add
    and the top-2K over K x V become two kernels; the ban's ids are still found by small (R, T) ops."""
    decoder = bench_components("tiny").decoder.eval()
    blocks = decode_kernels(decoder, 1, fused_blocks=True)
    step = decode_kernels(decoder, 1, fused_blocks=True, fused_beam_step=True)
    assert step["beam_head (Triton)"] == 2 and step["topk"] == blocks["topk"] - 1, step  # the finished set's two
    assert not {"native_layer_norm", "mm", "_log_softmax", "scatter_add_", "masked_fill"} & set(step), step
    assert {"native_layer_norm", "mm", "_log_softmax", "scatter_add_", "masked_fill"} <= set(blocks), blocks
    assert sum(step.values()) < sum(blocks.values())


@pytest.mark.parametrize("attention", ["sdpa", "matmul", "indirect"])
def test_a_decode_token_launches_per_layer_only_the_model(attention):
    """bench/gpu/step_kernels.py --decode: per GPT-2 layer, the norms fused with the residual adds, one GELU kernel
    (torch's tanh GELU, not gelu_new's eight elementwise ops), four matmuls, the two cache writes and attention:
    one SDPA kernel, or the scaled query, two batched matmuls, the mask's add and the softmax (no copies), or
    the one Triton kernel reading through the source table; the attention mask made once for all layers.
    Everything else (embedding, beam selection, reorder) does not grow with depth; with the table, the
    reorder is one gather of it instead of two of the caches, and each step writes its column once."""
    ops = decode_kernels(bench_components("tiny").decoder.eval(), 4, attention=attention)
    L = ModelConfig.from_preset("tiny").n_layer
    assert "tanh" not in ops and ops["pow"] == 1, ops  # the beam's length penalty; none from GELU
    assert ops["gelu"] == L and ops["add_layer_norm (Triton)"] == 2 * L and ops["native_layer_norm"] == 1, ops
    assert ops["addmm"] == 4 * L and ops["index_copy_"] == 2 * L + (attention == "indirect"), ops
    sdpa = sum(n for op, n in ops.items() if "scaled_dot_product" in op)
    if attention == "sdpa":
        assert sdpa == L and "bmm" not in ops and ops["index_select"] == 2, ops  # the reorder: keys, values
    elif attention == "matmul":
        assert sdpa == 0 and "clone" not in ops, ops
        assert ops["bmm"] == 2 * L and ops["_softmax"] == L and ops["add_"] == L + 1, ops  # + the step counter
    else:
        assert sdpa == 0 and "bmm" not in ops and ops["beam_attention (Triton)"] == L, ops
        assert ops["index_select"] == 1 and ops["index_copy_"] == 2 * L + 1, ops  # the table's gather and column
    per_layer = 1 + 4 + 2 + 2 + (5 if attention == "matmul" else 1)  # GELU, matmuls, cache writes, norms, attention
    rest = 96 if attention != "indirect" else 94  # + the table's column, - a cache gather, - the mask's 2 (in-kernel)
    assert sum(ops.values()) - per_layer * L == rest, ops  # the same at any depth (base, sdpa: 216 - 10 x 12)


def test_gpu_check_stage_limits_fit_one_device_call():
    """The device tool runs a command for at most 600 s: every stage of gpu_check.sh at its limit must fit, with
    time left for the start-up and the table."""
    script = (BENCH / "gpu_check.sh").read_text()
    limits = {name: int(seconds) for name, seconds in re.findall(r"^stage (\w+) (\d+) ", script, re.M)}
    assert {"install", "tests", "kernel", "latency", "training", "blocks_tests", "blocks", "tune", "blocks_autotune",
            "ort_cuda", "ort_bench"} <= set(limits), limits
    opt_in = re.search(r'^OPT_IN=" (.*) "$', script, re.M).group(1).split()
    assert opt_in == ["blocks_tests", "blocks", "tune", "blocks_autotune", "ort_cuda", "ort_bench"]  # a call each
    for call in (("blocks_tests", "blocks"), ("ort_cuda", "ort_bench")):  # the calls that run two stages
        assert limits["install"] + sum(limits[k] for k in call) <= 560, (call, limits)
    assert sum(v for k, v in limits.items() if k not in opt_in) <= 560, limits
    assert all(limits["install"] + limits[k] <= 560 for k in opt_in), limits


def test_the_table_sets_onnx_runtime_on_cuda_beside_the_engine(tmp_path):
    """Issue 23's rows: ORT's loop with its CUDA graph against the engine's (target 1.5x) and against ORT
    without the graph; its decode against the engine's (2x); the parity tests' summary."""
    rows = [{"backend": b, "batch": 8, "stage": stage, "median_s": ms / 1e3}
            for b, stage, ms in (("reference", "loop", 900.0), ("cuda-graph", "loop", 100.0), ("onnx", "loop", 400.0),
                                 ("onnx cuda-graph", "loop", 120.0), ("cuda-graph", "decode", 50.0),
                                 ("onnx", "decode", 90.0), ("onnx cuda-graph", "decode", 91.0))]
    (tmp_path / "ort_bench.json").write_text(json.dumps({"rows": rows}))
    (tmp_path / "ort_cuda.log").write_text("..\n2 passed, 30 deselected in 40.1s\n")
    table = subprocess.run([sys.executable, str(BENCH / "gpu" / "gpu_table.py"), str(tmp_path)], capture_output=True,
                           text=True, check=True).stdout
    assert "| ONNX Runtime CUDA parity (tests/test_gpu.py -k onnx) | 2 passed, 30 deselected in 40.1s | all pass |" in table
    loop = table.split("| batch 8: loop, ONNX Runtime on CUDA |")[1].splitlines()[0]
    assert "onnx cuda-graph 120.0 ms, onnx 400.0 ms, cuda-graph 100.0 ms" in loop and "ORT 1.20x the engine's" in loop
    assert "<= 1.5x the engine and < onnx without its graph" in loop
    decode = table.split("| batch 8: decode, ONNX Runtime on CUDA |")[1].splitlines()[0]
    assert "ORT 1.80x the engine's" in decode and "<= 2x the engine" in decode


def test_bench_refuses_onnx_cuda_graphs_without_a_gpu(capsys):
    from ldlm.cli import main

    assert main(["bench", "--preset", "tiny", "--backends", "onnx", "--onnx-cuda-graph", "--device", "cpu"]) == 2
    assert "--onnx-cuda-graph times the onnx backend's CUDA graphs" in capsys.readouterr().err
