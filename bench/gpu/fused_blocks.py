"""The engine's sampling loop with every matmul fused with its neighbours (ldlm.kernels.fused_linear) against the
engine as it is, and against torch.compile of the reference model driving the same sampler, in one run (issue 21).

    python bench/gpu/fused_blocks.py --preset base --batch-sizes 1 64 --dtypes float32 bfloat16 --fp8 \
        --compile-modes reduce-overhead --compile-batches 64 --json blocks.json
    python bench/gpu/fused_blocks.py --preset base --batch-sizes 64 --dtypes bfloat16 float32 \
        --compile-modes max-autotune --compile-batches 64 --no-engine --json autotune.json
    python bench/gpu/fused_blocks.py --preset base --decode-only --batch-sizes 1 64 --json decode.json
    TRITON_INTERPRET=1 python bench/gpu/fused_blocks.py --preset tiny --device cpu --batch-sizes 2 --sampler ddim \
        --steps 3 --compile-modes default --repeats 1      # smoke (Triton's interpreter; figures meaningless)

Paths, same seed and noise: `engine` (ldlm.fast.fused_sampler as the cuda-graph backend runs it: folded model, fused
norms, CUDA graphs on a GPU), `engine + fused blocks` (the same with fused_blocks=True), with --fp8 `engine +
fused blocks + fp8` (the blocks' weights as float8 e4m3 codes, fp8_weights=True: not exact; its latents' error
is the codes' rounding, which bench/quality/fp8_weights.py measures in text on a trained model), and `torch.compile
MODE` (the reference ReverseTransformer through torch.compile(mode=MODE, fullgraph=True, dynamic=False), called
by the reference sampler; compiled once per batch and dtype, its first call reported apart). Each path's
latents against the fp32 reference's (relative max error) and, per engine path, kernels a step
(ldlm.fast.launches) and the weights' read rate (bytes a step / time a step, as bench/gpu/latency.py counts them).
With --decode (or --decode-only), also the engine's static-KV beam decode (4 beams, 64 tokens: random weights
never emit EOS) with and without fused blocks (ldlm.fast.static_gpt2) and with the fused beam step
(ldlm.kernels.beam_head), tokens against the fp32 reference beam search; with --decode-peers, Hugging Face
generate beside them (its dynamic cache, and its static cache), the same settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from ldlm.sampling.beam_search import BeamSearchConfig, beam_search
from ldlm.jobs.benchmark import bench_components, timed
from ldlm.fast.fused_sampler import FusedSampler
from ldlm.fast.launches import decode_kernels, step_kernels
from ldlm.fast.static_beam_search import StaticBeamSearch
from ldlm.sampling.samplers import SAMPLERS
from ldlm.model.schedule import NoiseSchedule
from ldlm.fast.step_tables import sampler_tables

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import reverse_step_cost  # noqa: E402  (a sibling script: the step's bytes, counted once)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected).abs().max() / expected.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    parser.add_argument("--sampler", default="ddpm", choices=list(SAMPLERS))
    parser.add_argument("--steps", type=int, default=None, help="steps of ddim or dpm++2m (ddpm runs 1000)")
    parser.add_argument("--compile-modes", nargs="*", default=["reduce-overhead"],
                        help="torch.compile modes to time (none: no compiled peer)")
    parser.add_argument("--compile-batches", type=int, nargs="*", default=None,
                        help="batch sizes of the compiled peers (default: every batch size)")
    parser.add_argument("--no-engine", action="store_true", help="only the compiled peers (and the reference)")
    parser.add_argument("--fp8", action="store_true", help="also the fused blocks with float8 e4m3 weights")
    parser.add_argument("--decode", action="store_true", help="also time the beam decode with and without")
    parser.add_argument("--decode-only", action="store_true", help="only the beam decode")
    parser.add_argument("--decode-peers", action="store_true",
                        help="with the decode: also Hugging Face generate, eager and with its static cache")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows here (after every row: a time limit keeps what ran)")
    args = parser.parse_args()

    device = torch.device(args.device)
    components = bench_components(args.preset)
    model = components.reverse.eval().to(device)
    config = model.config
    schedule = NoiseSchedule.from_config(config).to(device)
    tables = sampler_tables(args.sampler, schedule.to("cpu"), steps=args.steps)
    sample = SAMPLERS[args.sampler]
    steps = {} if args.sampler == "ddpm" else {"steps": args.steps}
    compile_batches = args.batch_sizes if args.compile_batches is None else args.compile_batches
    paths = {} if args.no_engine else {  # path: FusedSampler's options
        "engine": {}, "engine + fused blocks": {"fused_blocks": True},
        **({"engine + fused blocks + fp8": {"fused_blocks": True, "fp8_weights": True}} if args.fp8 else {})}
    kernels = {path: sum(step_kernels(args.preset, 1, fused_blocks=options.get("fused_blocks", False)).values())
               for path, options in paths.items()}  # float8 weights change no launch
    result = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "sampler": args.sampler, "num_steps": tables.num_steps,
              "kernels_per_step": kernels, "rows": []}

    def noise(batch: int, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        return torch.randn(batch, *config.latent_shape, generator=g, device=device), g

    def record(row: dict) -> None:
        result["rows"].append(row)
        parity = (f"latents within {row['max_rel_err']:.1e}" if "max_rel_err" in row
                  else f"tokens {'identical' if row['tokens_identical'] else 'DIFFER'}")
        print(f"{row['dtype']:>9} batch {row['batch']:4d}  {row['path']:<28} {row['median_ms']:9.2f} ms "
              f"(p90 {row['p90_ms']:.2f})  {parity}"
              + (f"  {row['weights_gbs']:.0f} GB/s" if "weights_gbs" in row else "")
              + (f"  first call {row['first_call_s']:.1f} s" if row.get("first_call_s") else ""), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    with torch.no_grad():
        for batch in ([] if args.decode_only else args.batch_sizes):
            x, g = noise(batch)
            expected = sample(model, x, schedule, generator=g, disable=True, **steps)  # fp32, the parity target
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                reverse = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
                base = {"dtype": dtype_name, "batch": batch}
                for path, options in paths.items():
                    engine = FusedSampler(reverse, tables, device=device, dtype=dtype, **options)
                    x, g = noise(batch)
                    got = engine(x, g)
                    t = timed(lambda: engine(*noise(batch)), device, args.warmup, args.repeats)
                    step_s = t["median_s"] / tables.num_steps
                    _, bytes_moved = reverse_step_cost(engine.denoiser, batch, dtype.itemsize, tables.multistep)
                    bytes_moved -= fp8_bytes_saved(engine.denoiser, dtype.itemsize)
                    record({**base, "path": path, "median_ms": t["median_s"] * 1e3, "p90_ms": t["p90_s"] * 1e3,
                            "max_rel_err": rel_err(got, expected), "kernels_per_step": kernels[path],
                            "step_us": step_s * 1e6, "weights_gbs": bytes_moved / step_s / 1e9})
                if batch not in compile_batches:
                    continue
                for mode in args.compile_modes:
                    compiled = torch.compile(reverse, mode=None if mode == "default" else mode, fullgraph=True,
                                             dynamic=False)

                    def denoise(x_t, t_batch, compiled=compiled, dtype=dtype):
                        return compiled(x_t.to(dtype), t_batch).float()  # the sampler's arithmetic in fp32

                    def run(denoise=denoise):
                        x, g = noise(batch)
                        return sample(denoise, x, schedule, generator=g, disable=True, **steps)

                    t = timed(run, device, args.warmup, args.repeats)  # the first call compiles
                    got = run()
                    record({**base, "path": f"torch.compile {mode}", "median_ms": t["median_s"] * 1e3,
                            "p90_ms": t["p90_s"] * 1e3, "max_rel_err": rel_err(got, expected),
                            "first_call_s": t["first_call_s"]})
        if args.decode or args.decode_only:  # after the loops: a time limit keeps issue 21's rows first
            decode_rows(args, components.decoder.eval().to(device), device, record)


def fp8_bytes_saved(denoiser, itemsize: int) -> int:
    """Bytes a step reads less with float8 block weights: a byte a weight instead of `itemsize`, plus the
    scales (fp32, one per output channel)."""
    from ldlm.kernels.fused_linear import Fp8Linear

    layers = [m for m in denoiser.modules() if isinstance(m, Fp8Linear)]
    return sum(m.weight.numel() * (itemsize - 1) - m.scale.numel() * 4 for m in layers)


DECODE_PATHS = {  # path: StaticBeamSearch's options
    "decode engine": {}, "decode engine + fused blocks": {"fused_blocks": True},
    "decode engine + fused blocks + fused beam step": {"fused_blocks": True, "fused_beam_step": True}}


def decode_rows(args, decoder, device: torch.device, record) -> None:
    """The engine's beam decode with and without fused blocks and the fused beam step, per batch and dtype,
    beside the fp32 reference."""
    config = BeamSearchConfig(num_beams=4, max_new_tokens=args.max_new_tokens)
    kernels = {path: sum(decode_kernels(decoder.cpu(), 1, **options).values()) for path, options in DECODE_PATHS.items()}
    decoder.to(device)
    for batch in args.batch_sizes:
        latents = torch.randn(batch, decoder.config.latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
        expected = beam_search(decoder, latents, config)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            model = decoder if dtype == torch.float32 else copy.deepcopy(decoder).to(dtype)
            for path, options in DECODE_PATHS.items():
                search = StaticBeamSearch(model, batch_size=batch, config=config, graphs=device.type == "cuda",
                                          **options)
                x = latents.to(dtype)
                got = search(x)
                t = timed(lambda: search(x), device, args.warmup, args.repeats)
                record({"dtype": dtype_name, "batch": batch, "path": path, "median_ms": t["median_s"] * 1e3,
                        "p90_ms": t["p90_s"] * 1e3, "tokens_identical": got == expected,
                        "kernels_per_token": kernels[path],
                        "token_us": t["median_s"] / args.max_new_tokens * 1e6})
            for path, cache in (() if not args.decode_peers else HF_PATHS.items()):
                x = latents.to(dtype)
                got = hf_generate(model, x, config, cache)
                t = timed(lambda: hf_generate(model, x, config, cache), device, args.warmup, args.repeats)
                record({"dtype": dtype_name, "batch": batch, "path": path, "median_ms": t["median_s"] * 1e3,
                        "p90_ms": t["p90_s"] * 1e3, "tokens_identical": got == expected, "kernels_per_token": None,
                        "token_us": t["median_s"] / args.max_new_tokens * 1e6, "first_call_s": t["first_call_s"]})


# Hugging Face generate as a user runs it: its dynamic cache, or its static cache (with which transformers
# compiles the decoding forward itself where it supports that: its first call shows it)
HF_PATHS = {"decode HF generate": None, "decode HF generate, static cache": "static"}


def hf_generate(decoder, latents: torch.Tensor, config: BeamSearchConfig, cache: str | None) -> list[list[int]]:
    """GPT2LMHeadModel.generate on the decoder's prefix with the beam search's settings: token ids per item,
    EOS and what follows removed (as ldlm.sampling.beam_search returns them)."""
    prefix = decoder.prefix(latents)
    out = decoder.gpt2.generate(
        inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device),
        num_beams=config.num_beams, max_new_tokens=config.max_new_tokens,
        no_repeat_ngram_size=config.no_repeat_ngram_size, early_stopping=config.early_stopping,
        length_penalty=config.length_penalty, do_sample=False, eos_token_id=decoder.eos_token_id,
        pad_token_id=decoder.pad_token_id, **({"cache_implementation": cache} if cache else {}))
    eos = decoder.eos_token_id
    return [row[: row.index(eos)] if eos in row else row for row in out.tolist()]


if __name__ == "__main__":
    main()
