"""The engine against the reference on one model. The sampling loop, same seed and noise: the largest relative
error of the final latents (max |engine - reference| / max |reference|). The static-KV beam decode of the
reference's sampled latents: how many items get the reference's tokens. Each with torch's layer norms and with
the fused Triton add + norm kernels. On CPU the engine runs eagerly (Triton's interpreter).

    python bench/quality/engine_parity.py --preset base                  # random weights at the preset's sizes
    python bench/quality/engine_parity.py --checkpoint runs/e2e/model    # a trained model
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, for the CPU

import torch  # noqa: E402

import ldlm  # noqa: E402
from ldlm.sampling.beam_search import BeamSearchConfig, beam_search  # noqa: E402
from ldlm.jobs.benchmark import bench_components  # noqa: E402
from ldlm.fast.fused_sampler import FusedSampler  # noqa: E402
from ldlm.sampling.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m  # noqa: E402
from ldlm.model.schedule import NoiseSchedule  # noqa: E402
from ldlm.fast.static_beam_search import StaticBeamSearch  # noqa: E402
from ldlm.fast.step_tables import ddim_tables, ddpm_tables, dpmpp_2m_tables  # noqa: E402


def max_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a directory written by `ldlm train`")
    model.add_argument("--preset", help="random weights at this preset's sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--dpm-steps", type=int, default=20)
    parser.add_argument("--decode-items", type=int, default=32, help="latents to beam-decode both ways")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.checkpoint:
        pipeline = ldlm.load(args.checkpoint, device=device, backend="reference")
        reverse, decoder = pipeline.reverse, pipeline.decoder
    else:
        components = bench_components(args.preset)
        reverse, decoder = components.reverse.to(device).eval(), components.decoder.to(device).eval()
    schedule = NoiseSchedule.from_config(reverse.config)
    samplers = {
        "DDPM 1000": (ddpm_tables(schedule), lambda x, g: sample_ddpm(reverse, x, schedule.to(device), generator=g,
                                                                      disable=True)),
        f"DDIM {args.ddim_steps}": (ddim_tables(schedule, args.ddim_steps, 0.0),
                                    lambda x, g: sample_ddim(reverse, x, schedule.to(device), steps=args.ddim_steps,
                                                             eta=0.0, generator=g, disable=True)),
        f"DPM-Solver++(2M) {args.dpm_steps}": (dpmpp_2m_tables(schedule, args.dpm_steps),
                                               lambda x, g: sample_dpmpp_2m(reverse, x, schedule.to(device),
                                                                            steps=args.dpm_steps, disable=True)),
    }
    shape = (args.batch, *reverse.config.latent_shape)
    print(f"{args.checkpoint or args.preset}, batch {args.batch}, {device}: max relative error of the engine's "
          f"latents, seeds {args.seeds}")
    print("| sampler | torch norms | fused norms |")
    print("| --- | --- | --- |")
    for name, (tables, reference) in samplers.items():
        cells = []
        for fused_norms in (False, True):
            engine = FusedSampler(reverse, tables, device=device, graphs=False, fused_norms=fused_norms)
            errors = []
            for seed in args.seeds:
                runs = []
                for run in (reference, engine):
                    g = torch.Generator(device=device).manual_seed(seed)
                    runs.append(run(torch.randn(shape, generator=g, device=device), g))
                errors.append(max_relative_error(runs[1], runs[0]))
            cells.append(", ".join(f"{e:.1e}" for e in errors))
        print(f"| {name} | {cells[0]} | {cells[1]} |")

    # decode the reference's DDIM samples, denormalized as a pipeline would (random weights: the raw samples)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((args.decode_items, *reverse.config.latent_shape), generator=g, device=device)
    latents = samplers[f"DDIM {args.ddim_steps}"][1](x, g)
    if args.checkpoint:
        latents = pipeline.denormalize(latents)
    search = BeamSearchConfig(num_beams=4, max_new_tokens=args.max_new_tokens)
    expected = beam_search(decoder, latents, search)
    cells = []
    for fused_norms in (False, True):
        got = StaticBeamSearch(decoder, args.decode_items, search, fused_norms=fused_norms)(latents)
        cells.append(f"{sum(a == b for a, b in zip(got, expected))} / {len(expected)} identical")
    print(f"| beam decode, 4 beams, {args.max_new_tokens} tokens | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
