"""Capture granularity of the graphed sampling loop: steps per CUDA graph against speed and graph memory.

    python bench/gpu/graph_granularity.py --preset base --batch 64 --chunks 1 10 100 999 --json granularity.json

For each chunk size, a FusedSampler captures `chunk` DDPM steps per graph (999 = the whole noisy part of
the loop in one graph; chunk 100 replays nine graphs of 100 steps, one of 99 and the final step's); the
figure is the median time of a full 1000-step run after capture, and the memory the capture added
(torch.cuda.memory_reserved before and after the first run; a sampler's graphs share one pool).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ldlm.model.config import ModelConfig
from ldlm.fast.fused_sampler import FusedSampler
from ldlm.model.reverse import ReverseTransformer
from ldlm.model.schedule import NoiseSchedule
from ldlm.fast.step_tables import ddpm_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 10, 100, 999])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write results to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("CUDA graphs need a CUDA device")
    config = ModelConfig.from_preset(args.preset)
    reverse = ReverseTransformer(config).cuda().eval()
    tables = ddpm_tables(NoiseSchedule.from_config(config))
    x = torch.randn(args.batch, config.latent_dim, device="cuda")
    rows = []
    for chunk in args.chunks:
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        sampler = FusedSampler(reverse, tables, device="cuda", graphs=True, chunk=chunk)
        sampler(x, torch.Generator("cuda").manual_seed(0))  # captures
        torch.cuda.synchronize()
        graph_mb = (torch.cuda.memory_reserved() - before) / 2**20
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sampler(x, torch.Generator("cuda").manual_seed(0))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rows.append({"chunk": chunk, "median_ms": statistics.median(times) * 1e3, "graph_memory_mb": graph_mb})
        print(f"chunk {chunk:4d}: {rows[-1]['median_ms']:8.2f} ms per 1000 steps, capture added {graph_mb:8.1f} MiB",
              flush=True)
        del sampler
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "batch": args.batch, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
