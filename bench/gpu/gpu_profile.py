"""Where the engine's GPU time goes: per-kernel device time of one sampling step and of one beam-decode token
(torch.profiler over eager calls: the kernels a CUDA graph replays, without the launches), in fp32 (the parity
mode), fp32 with TF32 matmuls, and bf16, the token with each attention of ldlm.fast.static_gpt2; and the rate cuBLAS
reaches on the step's matmul shapes.

    python bench/gpu/gpu_profile.py --preset base --batch-sizes 1 64 --modes fp32 bf16 --json profile.json
    python bench/gpu/gpu_profile.py --preset tiny --device cpu --batch-sizes 2   # smoke: CPU ops, not kernels

The step is the engine's (ldlm.fast.fused_sampler: the folded reverse transformer, the fused add + norm and update
kernels, a noise draw); the token is the static-KV beam search's (GPT-2 on batch x beams rows, beam selection,
cache reorder). Kernels are grouped by name; "matmul" sums the cuBLAS/CUTLASS kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import traceback
from collections import Counter

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ldlm.jobs.benchmark import bench_components, sync, timed
from ldlm.fast.fused_sampler import FusedSampler
from ldlm.fast.launches import token_searcher
from ldlm.model.schedule import NoiseSchedule
from ldlm.fast.static_gpt2 import ATTENTION
from ldlm.fast.step_tables import ddpm_tables

MATMUL_NAMES = ("gemm", "gemv", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "splitk", "splitK", "nvjet")
ATTENTION_NAMES = ("fmha", "sdpa", "flash", "attention", "Attention")  # CUTLASS and cuDNN attention: not matmuls
MODES = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False)}


@contextlib.contextmanager
def tf32_matmuls(enabled: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def kernel_times(events, calls: int, device_type: DeviceType = DeviceType.CUDA) -> dict:
    """Per call: device microseconds and launches of each kernel name, from a profiler's events."""
    time_us, launches = Counter(), Counter()
    for event in events:
        if event.device_type == device_type:
            time_us[event.name] += event.time_range.elapsed_us() / calls
            launches[event.name] += 1 / calls
    matmul = sum(t for name, t in time_us.items()
                 if any(m in name for m in MATMUL_NAMES) and not any(a in name for a in ATTENTION_NAMES))
    return {"total_us": sum(time_us.values()), "matmul_us": matmul, "kernels": round(sum(launches.values()), 2),
            "top": [{"name": name[:100], "us": us, "launches": round(launches[name], 2)}
                    for name, us in time_us.most_common(12)]}


def profile_calls(fn, device: torch.device, calls: int = 10, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    return kernel_times(prof.events(), calls, DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU)


def step_profile(components, batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    """One DDPM step of the engine's loop, eagerly (graphs off), with the fused kernels as on a GPU."""
    config = components.config
    reverse = copy.deepcopy(components.reverse).to(device, dtype)
    sampler = FusedSampler(reverse, ddpm_tables(NoiseSchedule.from_config(config)), device=device, dtype=dtype,
                           graphs=False, fused_norms=True)
    buf = sampler._buffers_for((batch, *config.latent_shape))
    buf.step.fill_(500)  # mid-schedule; 12 calls stay inside it
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        return profile_calls(lambda: sampler._one_step(buf, generator, draw=True, from_table=False), device)


def decode_profile(components, batch: int, dtype: torch.dtype, device: torch.device, attention: str,
                   num_beams: int = 4) -> dict:
    """One token of the static-KV beam decode, eagerly (graphs off), with the fused add + norm kernels."""
    search = token_searcher(copy.deepcopy(components.decoder).to(device, dtype), batch, num_beams, attention)
    with torch.no_grad():  # 12 of its tokens are run
        state = search._prefill()
        return profile_calls(lambda: search.decode_step(state), device)


def matmul_rates(rows: int, shapes: list[tuple[int, int]], dtype: torch.dtype, device: torch.device) -> list[dict]:
    """cuBLAS on (rows, k) @ (k, n) for each (k, n), as F.linear runs it: TFLOP/s and weight GB/s."""
    out = []
    for k, n in shapes:
        x, w = torch.randn(rows, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
        if device.type == "cuda":
            from triton.testing import do_bench  # CUDA events, L2 flushed between calls

            seconds = do_bench(lambda: F.linear(x, w), warmup=10, rep=50) / 1e3  # noqa: B023
        else:
            seconds = timed(lambda: F.linear(x, w), device, 2, 5)["median_s"]  # noqa: B023
        out.append({"rows": rows, "k": k, "n": n, "us": seconds * 1e6, "tflops": 2 * rows * k * n / seconds / 1e12,
                    "weight_gbs": w.numel() * w.element_size() / seconds / 1e9})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--attention", nargs="+", default=list(ATTENTION), choices=list(ATTENTION),
                        help="the decode step's attentions to profile")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    modes = {mode: MODES[mode] for mode in (args.modes if device.type == "cuda" else ["fp32"])}
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "preset": args.preset,
               "torch": torch.__version__, "rows": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)

    components = bench_components(args.preset)
    for batch in args.batch_sizes:
        for mode, (dtype, tf32) in modes.items():
            parts = [("step", None, step_profile)] + [("decode_token", attention, decode_profile)
                                                        for attention in args.attention]
            for what, attention, run in parts:
                try:  # one part failing keeps the others
                    with tf32_matmuls(tf32):
                        extra = {} if attention is None else {"attention": attention}
                        row = {"what": what, "batch": batch, "mode": mode, **extra,
                               **run(components, batch, dtype, device, **extra)}
                except Exception:  # noqa: BLE001
                    traceback.print_exc()
                    continue
                results["rows"].append(row)
                save()
                print(f"{what:12s} batch {batch:3d} {mode} {attention or '':6s}: {row['total_us']:8.1f} us of kernels, "
                      f"{row['kernels']:.0f} launches, matmuls {row['matmul_us']:.1f} us", flush=True)
                for top in row["top"][:6]:
                    print(f"    {top['us']:8.1f} us  x{top['launches']:<5g} {top['name']}")
    hidden = components.config.d_model
    shapes = [(hidden, hidden), (hidden, 4 * hidden), (4 * hidden, hidden)]
    results["matmul"] = []
    for rows in args.batch_sizes:
        for mode, (dtype, tf32) in modes.items():
            with tf32_matmuls(tf32):
                for rate in matmul_rates(rows, shapes, dtype, device):
                    results["matmul"].append({"mode": mode, **rate})
                    print(f"matmul {mode} ({rows}, {rate['k']}) @ ({rate['k']}, {rate['n']}): {rate['us']:6.1f} us, "
                          f"{rate['tflops']:6.2f} TFLOP/s, weights {rate['weight_gbs']:6.0f} GB/s", flush=True)
    save()


if __name__ == "__main__":
    main()
