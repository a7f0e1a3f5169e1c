"""The reverse transformer's forward as designed (ldlm.model.reverse) against the engine's folded form
(ldlm.fast.folded_reverse: time as an input-bias row, one-token attention as one matrix), in one run: median time per
call and the largest relative difference of their outputs. On a CPU the ratio is what holds.

    python bench/cpu/reverse_forward.py --preset base --batch-sizes 1 8 64
"""

from __future__ import annotations

import argparse
import time

import torch

from ldlm.model.config import ModelConfig
from ldlm.fast.folded_reverse import FoldedReverse
from ldlm.model.reverse import ReverseTransformer


def median_seconds(fn, calls: int, repeats: int = 5) -> float:
    for _ in range(10):  # warm-up
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    config = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    model = ReverseTransformer(config).eval()
    timesteps = torch.linspace(999, 0, 1000)
    folded = FoldedReverse(model, timesteps)
    step = torch.tensor([500])
    print(f"{args.preset}: reverse transformer forward, median of 5 x {args.calls} calls")
    print("| batch | model (ms) | folded (ms) | ratio | max relative difference |")
    print("| --- | --- | --- | --- | --- |")
    for batch in args.batch_sizes:
        x = torch.randn(batch, *config.latent_shape)
        t = torch.full((batch,), float(timesteps[step]))
        expected, got = model(x, t), folded(x, step)
        difference = ((got - expected).abs().max() / expected.abs().max()).item()
        designed = median_seconds(lambda: model(x, t), args.calls)
        engine = median_seconds(lambda: folded(x, step), args.calls)
        print(f"| {batch} | {designed * 1e3:.2f} | {engine * 1e3:.2f} | {designed / engine:.2f}x | {difference:.1e} |")


if __name__ == "__main__":
    main()
