"""What float8 e4m3 weights cost a trained model in latents and text (issue 21): the engine's fused blocks
with the blocks' weights as Fp8Linear codes, against the model's own weights, same seeds and noise.

    TRITON_INTERPRET=1 python bench/quality/fp8_weights.py runs/e2e-small/small --samples 64 [--json fp8.json]

Rows, each against the fp32 loop: bf16 (the speed mode as it is), fp8 weights with fp32 activations (the
codes' rounding alone), fp8 weights with bf16 activations (the speed mode with fp8). Each runs the checkpoint's
sampler over the same noise through ldlm.fast.fused_sampler with fused_blocks; the matmuls run as
ldlm.kernels.reference.modules_linear (torch's modules on the same Fp8Linear codes, which tests/test_fused_linear.py
holds the Triton kernel to within 1e-5), so it runs at torch's speed on a CPU; on a GPU bench/gpu/fused_blocks.py
--fp8 times the kernel itself. Reported: the one-step x0 error at five timesteps (relative L2, mean over
items), the final latents' error (relative L2 per item: mean and worst), and how many decoded texts (the
checkpoint's beam search) are word for word the fp32 loop's.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import ldlm
from ldlm.fast.fused_sampler import FusedSampler
from ldlm.kernels.reference import modules_linear
from ldlm.fast.step_tables import sampler_tables

VARIANTS = {  # name: (activations' dtype, fp8 weights)
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "fp8 weights, fp32 activations": (torch.float32, True),
    "fp8 weights, bf16 activations": (torch.bfloat16, True),
}


def relative_l2(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Per item: ||got - expected|| / ||expected||, over all but the first dimension."""
    diff = (got.float() - expected).flatten(1).norm(dim=1)
    return diff / expected.flatten(1).norm(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()

    pipe = ldlm.load(args.checkpoint, backend="reference")
    sampler, steps = pipe.sampling(None, None)
    tables = sampler_tables(sampler, pipe.schedule.to("cpu"), steps=steps)
    shape = (args.samples, *pipe.config.latent_shape)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    probe_steps = torch.linspace(0, tables.num_steps - 1, 5).round().long()  # one-step x0 at these steps
    probe_x = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed + 1))

    results, reference = [], {}
    with torch.no_grad():
        for name, (dtype, fp8) in VARIANTS.items():
            model = pipe.reverse if dtype == torch.float32 else copy.deepcopy(pipe.reverse).to(dtype)
            engine = FusedSampler(model, tables, device="cpu", dtype=dtype, graphs=False, fused_blocks=True,
                                  fp8_weights=fp8)
            engine.denoiser.linear = modules_linear  # torch on the same codes: the kernel's function at torch speed
            x0 = torch.stack([engine.denoiser(probe_x.to(dtype), s.view(1)).float() for s in probe_steps])
            g = torch.Generator().manual_seed(args.seed + 2)
            z = engine(x_T.to(dtype), g).float()
            texts = pipe.decode(pipe.denormalize(z), progress=False)
            if name == "fp32":
                reference = {"x0": x0, "z": z, "texts": texts}
            row = {"variant": name, "sampler": sampler, "steps": tables.num_steps, "samples": args.samples,
                   "x0_rel_l2": [relative_l2(a, b).mean().item() for a, b in zip(x0, reference["x0"])],
                   "latent_rel_l2_mean": relative_l2(z, reference["z"]).mean().item(),
                   "latent_rel_l2_max": relative_l2(z, reference["z"]).max().item(),
                   "texts_identical": sum(a == b for a, b in zip(texts, reference["texts"])),
                   "examples": [[a, b] for a, b in zip(texts, reference["texts"]) if a != b][:3]}
            results.append(row)
            print(f"{name:<32} x0 err {' '.join(f'{e:.2%}' for e in row['x0_rel_l2'])}  latents "
                  f"{row['latent_rel_l2_mean']:.2%} (worst {row['latent_rel_l2_max']:.2%})  texts as fp32 "
                  f"{row['texts_identical']}/{args.samples}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
