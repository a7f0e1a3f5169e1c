"""Few-step samplers against the converged solution of the same model: how many steps each needs.

DDIM (eta 0) and DPM-Solver++(2M) both solve the model's probability-flow ODE. From the same starting noise
x_T, each is run at a list of step counts and compared with a converged solution, DDIM with every one of
the T steps: the latent error (|z - z_ref| / |z_ref| per sample, averaged) and how many samples decode
(beam search) to the converged solution's text. The time a run of a sampler takes is its step count
times one model call, so fewer steps for the same error is the speedup; the wall time of each run is printed
as measured here (compare ratios on a CPU).

    python bench/quality/solver_error.py runs/e2e/model --json solver_error.json
"""

from __future__ import annotations

import argparse
import json
import time

import ldlm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a directory written by `ldlm train`")
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpm++2m"])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 15, 20, 30, 50, 100])
    parser.add_argument("-n", type=int, default=64, help="samples (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()

    pipe = ldlm.load(args.checkpoint, device=args.device, backend="reference")
    common = {"seed": args.seed, "progress": False}
    converged = pipe.sample_latents(args.n, sampler="ddim", steps=pipe.schedule.num_timesteps, **common)
    converged_texts = pipe.decode(converged, progress=False)
    norm = converged.flatten(1).norm(dim=1)
    rows = []
    for sampler in args.samplers:
        for steps in args.steps:
            start = time.perf_counter()
            latents = pipe.sample_latents(args.n, sampler=sampler, steps=steps, **common)
            seconds = time.perf_counter() - start
            texts = pipe.decode(latents, progress=False)
            rows.append({"sampler": sampler, "steps": steps, "seconds": seconds,
                         "latent_error": ((latents - converged).flatten(1).norm(dim=1) / norm).mean().item(),
                         "same_text": sum(a == b for a, b in zip(texts, converged_texts)) / args.n})
            print(f"{sampler:>8} {steps:>4} steps  latent error {rows[-1]['latent_error']:.4f}  "
                  f"same text {rows[-1]['same_text']:.3f}  {seconds:.2f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "n": args.n, "seed": args.seed, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
