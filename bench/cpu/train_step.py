"""Stage-2 training step cost by latent tokens K and batch size: one Adam step of the reverse transformer
(forward, MSE to the clean latent, backward, update) on random latents, median of --repeats timed steps.

    python bench/cpu/train_step.py --preset small --shapes 1x256 4x256 4x64 --json step.json

Each shape is KxB: K latent tokens per text, B texts a step. The reverse transformer sees K * B tokens a step,
so 4x64 should cost what 1x256 does (bench/RESULTS.md, issue 4)."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from ldlm.model.config import PRESETS, ModelConfig, size_overrides
from ldlm.model.reverse import ReverseTransformer


def step_seconds(config: ModelConfig, batch: int, repeats: int, warmup: int = 3) -> float:
    torch.manual_seed(0)
    model = ReverseTransformer(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x_t = torch.randn(batch, *config.latent_shape)  # (B, D) or (B, K, D)
    z0 = torch.randn(batch, *config.latent_shape)
    t = torch.randint(0, config.num_timesteps, (batch,)).float()  # (B,)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        loss = F.mse_loss(model(x_t, t), z0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model preset (default small)")
    parser.add_argument("--shapes", nargs="+", default=["1x256", "4x256", "4x64"],
                        help="KxB: latent tokens per text x texts per step (default 1x256 4x256 4x64)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per shape (default 10)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    rows = []
    for shape in args.shapes:
        k, batch = (int(v) for v in shape.split("x"))
        config = ModelConfig.from_preset(args.preset, **size_overrides(args.preset, None, k))
        seconds = step_seconds(config, batch, args.repeats)
        rows.append({"latent_tokens": k, "batch": batch, "tokens_per_step": k * batch, "step_s": seconds})
    base = rows[0]["step_s"]
    print("| K | batch | tokens a step | step (s) | vs first |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [r["latent_tokens"], r["batch"], r["tokens_per_step"], f"{r['step_s']:.3f}", f"{r['step_s'] / base:.2f}x"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
