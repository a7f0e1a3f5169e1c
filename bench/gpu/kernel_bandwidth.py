"""Bandwidth of the fused update kernel against a device-to-device copy (as in Triton's vector-add tutorial).

    python bench/gpu/kernel_bandwidth.py --json kernel.json

The kernel reads x_t, x0_hat and noise and writes x_next: 4 * numel * itemsize bytes per call; DPM-Solver++(2M)'s
variant also reads the previous x0_hat and writes this one into the history: 6 * numel * itemsize. A copy moves
2 * numel * itemsize. All are reported in GB/s, and the kernel as a share of copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ldlm.kernels.fused_update import fused_update
from ldlm.model.schedule import NoiseSchedule
from ldlm.fast.step_tables import ddpm_tables, dpmpp_2m_tables


def time_cuda(fn, repeats: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--json", help="write results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark measures GPU bandwidth: run it on a CUDA device")
    schedule = NoiseSchedule.linear()
    updates = {"ddpm": ddpm_tables(schedule).to("cuda"), "dpm++2m": dpmpp_2m_tables(schedule, 20).to("cuda")}
    step = torch.tensor([10], dtype=torch.int64, device="cuda")
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for shape in [(64, 768), (256, 768), (4096, 768), (65536, 768), (262144, 768)]:
            x, x0, noise, history = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4))
            out = torch.empty_like(x)
            nbytes = x.numel() * x.element_size()
            copy_s = time_cuda(lambda: out.copy_(x))
            for update, tables in updates.items():
                multistep = {"history": history, "coef_prev": tables.coef_prev} if tables.multistep else {}
                kernel_s = time_cuda(lambda: fused_update(x, x0, noise, tables.coef_x0, tables.coef_xt,
                                                          tables.coef_noise, step, out=out, **multistep))
                moved = (6 if multistep else 4) * nbytes
                row = {"update": update, "dtype": dtype_name, "shape": list(shape),
                       "kernel_gbs": moved / kernel_s / 1e9, "copy_gbs": 2 * nbytes / copy_s / 1e9,
                       "kernel_us": kernel_s * 1e6}
                row["share_of_copy"] = row["kernel_gbs"] / row["copy_gbs"]
                rows.append(row)
                print(f"{update:8s} {dtype_name:9s} {str(shape):15s} kernel {row['kernel_gbs']:7.0f} GB/s "
                      f"({row['kernel_us']:7.1f} us)  copy {row['copy_gbs']:7.0f} GB/s  "
                      f"share {row['share_of_copy']:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
