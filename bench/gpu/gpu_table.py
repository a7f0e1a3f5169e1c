"""The short table bench/gpu_check.sh prints last: each measured figure beside its target (issue 3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(log: list[str]) -> str:
    """pytest's last summary line in a log ("3 passed in 1.2s"), else its last line."""
    return next((line for line in reversed(log) if "passed" in line or "failed" in line), log[-1] if log else "missing")


# issue 21's targets for the sampling loop (base, 1000 DDPM steps), by (dtype, batch)
LOOP_TARGETS_MS = {("bfloat16", 64): 25.0, ("float32", 64): 250.0, ("bfloat16", 1): 15.0}
# issue 22's for the beam decode (base, 4 beams, 64 new tokens)
DECODE_TARGETS_MS = {("bfloat16", 64): 40.0, ("bfloat16", 1): 8.0}


def fused_block_lines(out: Path) -> list[str]:
    """bench/gpu/fused_blocks.py's rows (blocks.json, and blocks_autotune.json for the max-autotune peer): each path's
    sampling loop beside issue 21's target, the engine's speed-up over the best torch.compile mode, float8
    weights' time against the fused blocks' in the same run; each decode path's time and tokens."""
    rows = [r for name in ("blocks.json", "blocks_autotune.json") if (out / name).exists()
            for r in json.loads((out / name).read_text())["rows"]]
    lines = []
    if (out / "blocks_tests.log").exists():  # the fused kernels' parity on CUDA, run before the timings
        log = (out / "blocks_tests.log").read_text().strip().splitlines()
        lines.append(f"| fused_linear and beam_head on CUDA (tests/test_fused_linear.py, test_beam_head.py) | "
                     f"{summary(log)} | all pass |")
    same_run = {(r["dtype"], r["batch"]): r["median_ms"] for r in rows if r["path"] == "engine + fused blocks"}
    for r in rows:
        if r["path"].startswith("decode"):  # issue 22's: the beam decode with and without fused blocks
            kernels = f", {r['kernels_per_token']} kernels" if r.get("kernels_per_token") else ""
            hf = [p["median_ms"] for p in rows if p["path"] == "decode HF generate"
                  and (p["dtype"], p["batch"]) == (r["dtype"], r["batch"])]
            engine = r["path"].startswith("decode engine")
            vs = f", {hf[0] / r['median_ms']:.1f}x HF generate" if hf and engine else ""
            target = DECODE_TARGETS_MS.get((r["dtype"], r["batch"])) if engine else None
            want = (f"<= {target:g} ms" + (" and >= 10x HF generate" if r["batch"] == 64 else "") + "; "
                    if target else "")
            lines.append(f"| {r['path']}, {r['dtype']}, batch {r['batch']} | {r['median_ms']:.1f} ms "
                         f"({r['token_us']:.0f} us a token{kernels}){vs}, tokens "
                         f"{'identical' if r['tokens_identical'] else 'DIFFER'} | {want}fp32: identical |")
            continue
        target = LOOP_TARGETS_MS.get((r["dtype"], r["batch"])) if r["path"].startswith("engine") else None
        peers = [p["median_ms"] for p in rows if p["path"].startswith("torch.compile")
                 and (p["dtype"], p["batch"]) == (r["dtype"], r["batch"])]
        vs = f", {min(peers) / r['median_ms']:.1f}x the best torch.compile" if peers and target else ""
        if r["path"].endswith("fp8") and (r["dtype"], r["batch"]) in same_run:
            vs += f", {same_run[r['dtype'], r['batch']] / r['median_ms']:.2f}x the fused blocks' time"
        extra = (f", {r['kernels_per_step']} kernels a step, weights read at {r['weights_gbs']:.0f} GB/s"
                 if "weights_gbs" in r else f", first call {r['first_call_s']:.0f} s" if r.get("first_call_s") else "")
        want = f"<= {target:g} ms" + (" and >= 2x torch.compile" if r["batch"] == 64 and r["dtype"] == "bfloat16"
                                      else "") if target else ""
        lines.append(f"| sampling loop, {r['path']}, {r['dtype']}, batch {r['batch']} | {r['median_ms']:.1f} ms{vs}, "
                     f"latents within {r['max_rel_err']:.1e}{extra} | {want} |")
    return lines


def tile_lines(out: Path) -> list[str]:
    """bench/gpu/tune_tiles.py's table (tiles.json): how many shapes it tuned, and the bf16 sampling step's at batch
    64 (the headline's shapes) with the untuned rule's time beside the tuned one's."""
    if not (out / "tiles.json").exists():
        return []
    lines = []
    for gpu, kernels in json.loads((out / "tiles.json").read_text())["gpus"].items():
        shapes = kernels.get("fused_linear", {})
        gain = sum(e["default_us"] for e in shapes.values()) / max(1e-9, sum(e["us"] for e in shapes.values()))
        lines.append(f"| fused_linear tiles tuned on {gpu} | {len(shapes)} shapes, {gain:.2f}x their untuned "
                     f"time in all | commit into kernels/tiles.json |")
        for key, e in shapes.items():
            if key.startswith("bfloat16/same/") and "/m64/" in key and e["where"] == "step":
                lines.append(f"| tiles {key} | {e['default_us']:.1f} -> {e['us']:.1f} us ({e['block_m']}x"
                             f"{e['block_n']}x{e['block_k']}, split {e['split_k']}, {e['num_warps']} warps) | |")
    return lines


def ort_lines(out: Path) -> list[str]:
    """`ldlm bench` on the GPU with ONNX Runtime's CUDA provider (ort_bench.json) and the ORT parity tests
    (the ort_cuda stage's log): per batch, the ORT loop with and without its CUDA graph beside the engine's,
    and its decode, against issue 23's targets (loop within 1.5x of the engine's and faster than without the
    graph; decode within 2x)."""
    lines = []
    if (out / "ort_cuda.log").exists():
        log = (out / "ort_cuda.log").read_text().strip().splitlines()
        lines.append(f"| ONNX Runtime CUDA parity (tests/test_gpu.py -k onnx) | {summary(log)} | all pass |")
    if not (out / "ort_bench.json").exists():
        return lines
    rows = json.loads((out / "ort_bench.json").read_text())["rows"]
    ms = {(r["backend"], r["batch"], r["stage"]): r["median_s"] * 1e3 for r in rows}
    engine = next((b for b in ("cuda-graph", "fused") if any(k[0] == b for k in ms)), None)
    for batch in sorted({r["batch"] for r in rows}):
        for stage, target in (("loop", 1.5), ("decode", 2.0), ("end_to_end", None)):
            times = {b: ms[b, batch, stage] for b in ("onnx cuda-graph", "onnx", engine, "reference")
                     if (b, batch, stage) in ms}
            ort = times.get("onnx cuda-graph" if stage == "loop" else "onnx", times.get("onnx"))
            if ort is None or engine not in times:
                continue
            measured = ", ".join(f"{b} {t:.1f} ms" for b, t in times.items())
            ratio = f"; ORT {ort / times[engine]:.2f}x the engine's time"
            want = f"<= {target:g}x the engine" + (" and < onnx without its graph" if stage == "loop" else "")
            lines.append(f"| batch {batch}: {stage}, ONNX Runtime on CUDA | {measured}{ratio} | "
                         f"{want if target else ''} |")
    return lines


def main(out: Path) -> None:
    lines = ["| check | measured | target |", "| --- | --- | --- |"]
    log = (out / "tests.log").read_text().strip().splitlines() if (out / "tests.log").exists() else []
    split = log.index("== training") if "== training" in log else len(log)  # gpu_check.sh appends training's log
    if log[:split]:
        lines.append(f"| GPU tests (parity, graphs) | {summary(log[:split])} | all pass |")
    if (out / "kernel.json").exists():
        rows = json.loads((out / "kernel.json").read_text())["rows"]
        for update, target in (("ddpm", ">= 70% of copy"), ("dpm++2m", "-")):
            for dtype in ("float32", "bfloat16"):
                variant = [r for r in rows if r.get("update", "ddpm") == update and r["dtype"] == dtype]
                if variant:  # the largest size: smaller ones time the launch, not the memory
                    big = max(variant, key=lambda r: r["shape"][0] * r["shape"][1])
                    lines.append(f"| fused kernel bandwidth ({update} update, {dtype}, {big['shape']}) | "
                                 f"{big['kernel_gbs']:.0f} GB/s = {big['share_of_copy']:.0%} of copy | {target} |")
    if (out / "latency.json").exists():
        lat = json.loads((out / "latency.json").read_text())
        launches = lat.get("launches", {})

        def per_kernel(us: float, what: str) -> str:  # the time a step's kernels take each, on average
            return f", {launches[what]} kernels = {us / launches[what]:.1f} us each" if what in launches else ""
        loop = "1000 DDPM steps" if lat["sampler"] == "ddpm" else f"DDIM {lat['steps'] or 50} steps"
        decode = f"{lat.get('num_beams', 4)} beams, {lat.get('max_new_tokens', 64)} tokens"
        for row in lat["rows"]:
            b = row["batch"]
            target_s = " (target >= 15x)" if b == 64 else ""
            target_d = " (target >= 10x)" if b == 64 else ""
            lines.append(f"| batch {b}: sampling loop, {loop} | {row['sample_reference']['median_s']*1e3:.0f} -> "
                         f"{row['sample_engine']['median_s']*1e3:.1f} ms = {row['speedup_sample']:.1f}x; step "
                         f"{row['per_step']['engine_us']:.0f} us vs floor {row['per_step']['floor_us']:.0f} us, "
                         f"{row['per_step']['engine_tflops']:.2f} TFLOP/s, {row['per_step']['engine_gbs']:.0f} GB/s"
                         f"{per_kernel(row['per_step']['engine_us'], 'sampling_step')} |{target_s} |")
            if b == 64 and "parity" in row:
                parity = row["parity"]
                lines.append(f"| batch 64: engine vs reference, same seed, fp32 | latents within "
                             f"{parity['max_rel_err']:.1e} relative, text "
                             f"{'identical' if parity['text_identical'] else 'DIFFERS'} | <= 1e-5, identical |")
            if "speedup_decode_vs_hf" in row:
                token = row.get("decode_per_token", {})
                bound = (f"; token {token['engine_us']:.0f} us (HF {token['hf_us']:.0f}) vs floor {token['floor_us']:.0f} "
                         f"us, {token['engine_tflops']:.1f} TFLOP/s, {token['engine_gbs']:.0f} GB/s"
                         f"{per_kernel(token['engine_us'], 'decode_token')}" if token else "")
                lines.append(f"| batch {b}: beam decode, {decode} | HF {row['decode_hf_generate']['median_s']*1e3:.0f} "
                             f"-> {row['decode_engine']['median_s']*1e3:.0f} ms = {row['speedup_decode_vs_hf']:.1f}x{bound} |"
                             f"{target_d} |")
        rates = lat["rates"]
        lines.append(f"| device | {lat['device']}, engine {lat['engine_backend']}; measured peaks "
                     f"{rates['matmul_tflops']:.1f} TFLOP/s (fp32 matmul), {rates['copy_gbs']:.0f} GB/s (copy) | |")
    if (out / "granularity.json").exists():
        for row in json.loads((out / "granularity.json").read_text())["rows"]:
            lines.append(f"| graph granularity, batch 64: {row['chunk']} steps per graph | {row['median_ms']:.1f} ms per "
                         f"1000 steps, {row['graph_memory_mb']:.0f} MiB | fastest within memory |")
    if (out / "latency_bf16.json").exists():
        row = json.loads((out / "latency_bf16.json").read_text())["rows"][0]
        lines.append(f"| batch {row['batch']} bf16 engine: sampling loop | {row['sample_engine']['median_s']*1e3:.1f} ms = "
                     f"{row['speedup_sample']:.1f}x vs fp32 reference | (target >= 15x) |")
        if "speedup_decode_vs_hf" in row:
            hf_ms, engine_ms = row["decode_hf_generate"]["median_s"] * 1e3, row["decode_engine"]["median_s"] * 1e3
            lines.append(f"| batch {row['batch']} bf16 engine: beam decode | HF (fp32) {hf_ms:.0f} -> {engine_ms:.0f} ms "
                         f"= {row['speedup_decode_vs_hf']:.1f}x | (target >= 10x) |")
    if (out / "profile.json").exists():
        for row in json.loads((out / "profile.json").read_text())["rows"]:
            top = row["top"][0] if row["top"] else {"name": "-", "us": 0}
            attention = f", {row['attention']} attention" if "attention" in row else ""
            what = f"{row['what']} ({row['mode']}{attention})"
            lines.append(f"| profile, batch {row['batch']} {what} | {row['total_us']:.0f} us of "
                         f"kernels, {row['kernels']:.0f} launches, matmuls {row['matmul_us']:.0f} us; top "
                         f"{top['us']:.0f} us {top['name'][:48]} | |")
    lines += fused_block_lines(out)
    lines += tile_lines(out)
    lines += ort_lines(out)
    if log[split + 1:]:
        lines.append(f"| training on CUDA (tests/test_training.py) | {summary(log[split + 1:])} | all pass |")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
