"""Latency of the sampling loop, the beam decode and end to end: reference and engine side by side.

    python bench/gpu/latency.py --preset base --device cuda --batch-sizes 1 8 64 256 --json out.json
    TRITON_INTERPRET=1 python bench/gpu/latency.py --preset tiny --device cpu --batch-sizes 1 8 --engine-backend fused \
        --sampler ddim --steps 20 --max-new-tokens 16 --repeats 1   # smoke (tiny's decoder holds 40 positions)

Models are built from the preset's config with random weights (no downloads; ldlm.jobs.benchmark). Random GPT-2 weights
never emit EOS, so every decode runs the full --max-new-tokens: a fixed, worst-case workload. Warm-up
runs are excluded; each figure is the median and p90 over --repeats. Each batch also records parity: the
engine's latents against the reference's (same seed and noise) and whether the texts they decode to are
identical. The sampling loop's FLOPs and bytes per step are counted from the model's shapes and compared with
a floor: max(FLOPs / matmul rate, bytes / copy bandwidth), both measured on this device in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from ldlm.sampling.beam_search import BeamSearchConfig, beam_search
from ldlm.model.config import SAMPLER_NAMES
from ldlm.jobs.benchmark import bench_components, timed
from ldlm.fast.folded_reverse import FoldedReverse
from ldlm.fast.launches import decode_kernels, step_kernels
from ldlm.pipeline import Pipeline
from ldlm.fast.step_tables import sampler_tables


def reverse_step_cost(denoiser: FoldedReverse, batch: int, bytes_per_element: int = 4,
                      multistep: bool = False) -> tuple[float, float]:
    """(FLOPs, bytes) of one engine sampling step: the reverse transformer as the engine runs it
    (ldlm.fast.folded_reverse: each step's time an input-bias row; with one latent token, attention's value and
    output projections folded into one matrix and no query or key), plus the update (read x, x0_hat, noise;
    write x; a multistep solver also reads and writes its history). Every tensor the step reads is read once; FLOPs are the matmuls' (the elementwise work and the
    attention scores over K tokens, K^2 d per block, are left out)."""
    cfg = denoiser.config
    K, D = cfg.latent_tokens, cfg.latent_dim
    blocks = [[*block.ln_1.parameters(), *block.ln_2.parameters(), *block.mlp.parameters()]
              + ([] if K == 1 else [*block.attn.parameters()]) for block in denoiser.blocks]
    read = [denoiser.in_weight, *denoiser.value_out.parameters(), *sum(blocks, []), *denoiser.ln_f.parameters(),
            *denoiser.out_proj.parameters()]
    matmul_params = sum(t.numel() for t in read if t.dim() == 2)
    flops = 2.0 * matmul_params * batch * K
    update = (6 if multistep else 4) * batch * K * D
    bytes_moved = (sum(t.numel() for t in read) + denoiser.step_bias[0].numel() + update) * bytes_per_element
    return flops, bytes_moved


def decode_token_cost(gpt2, rows: int, max_len: int, bytes_per_elem: int = 4) -> tuple[float, float]:
    """(FLOPs, bytes) of one token of the engine's beam decode: GPT-2 on `rows` (= batch x beams) tokens with
    attention over the static cache length `max_len`, and the LM head over the vocabulary. Bytes: the weights
    once; the KV cache read by attention and gathered by the beam reorder (a read and a write: three passes);
    the logits written, then read by log-softmax and top-k (float32)."""
    cfg = gpt2.config
    E, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    matmul_params = L * 12 * E * E + V * E  # per layer qkv 3E^2, projection E^2, MLP 8E^2; the LM head
    flops = 2.0 * matmul_params * rows + 4.0 * rows * L * max_len * E  # + attention: q.k and p.v
    cache = 2 * L * rows * max_len * E * bytes_per_elem  # keys and values
    params = sum(p.numel() for p in gpt2.parameters())
    return flops, params * bytes_per_elem + 3 * cache + 3 * rows * V * 4


def floor_seconds(flops: float, bytes_moved: float, rates: dict) -> float:
    return max(flops / (rates["matmul_tflops"] * 1e12), bytes_moved / (rates["copy_gbs"] * 1e9))


def device_rates(device: torch.device) -> dict:
    """Measured matmul FLOP/s (fp32) and device copy bandwidth, for the floor."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    mm = timed(lambda: a @ b, device, 2, 5)["median_s"]
    src = torch.empty(64 * 2**20 if device.type == "cuda" else 8 * 2**20, device=device)
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), device, 2, 5)["median_s"]
    return {"matmul_tflops": 2 * n**3 / mm / 1e12, "copy_gbs": 2 * src.numel() * 4 / copy / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base", help="model sizes (default base)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--engine-backend", default="auto", help="backend for the engine column (default auto)")
    parser.add_argument("--dtype", default="float32", help="engine dtype: float32 (parity), bfloat16, float16")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--sampler", default="ddpm", choices=SAMPLER_NAMES)
    parser.add_argument("--steps", type=int, default=None, help="steps of ddim or dpm++2m (ddpm always runs 1000)")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=None, help="decoder vocabulary (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-hf", action="store_true", help="do not time Hugging Face generate")
    parser.add_argument("--json", help="write all results to this file")
    args = parser.parse_args()

    device = torch.device(args.device)
    components = bench_components(args.preset, args.vocab_size)
    # kernels a graphed sampling step and a decoded token launch (counted on the CPU, before the models move)
    launches = {"sampling_step": sum(step_kernels(args.preset, 1).values()),
                "decode_token": sum(decode_kernels(components.decoder.eval(), 1, args.num_beams).values())}
    reference = Pipeline(components, device, backend="reference")
    engine = Pipeline(components, device, backend=args.engine_backend, dtype=args.dtype)
    config = reference.config
    search = BeamSearchConfig(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    rates = device_rates(device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "preset": args.preset, "engine_backend": engine.backend, "dtype": args.dtype, "torch": torch.__version__,
               "sampler": args.sampler, "steps": args.steps, "num_beams": args.num_beams,
               "max_new_tokens": args.max_new_tokens, "rates": rates, "launches": launches, "rows": []}
    print(f"device {results['device']}, engine backend {engine.backend}, matmul {rates['matmul_tflops']:.2f} TFLOP/s, "
          f"copy {rates['copy_gbs']:.0f} GB/s")
    sample = dict(sampler=args.sampler, steps=args.steps, seed=0, progress=False)
    denoiser = FoldedReverse(reference.reverse, torch.zeros(1))  # the engine's model, for its shapes

    for batch in args.batch_sizes:
        latents = torch.randn(batch, config.latent_dim, device=device)
        row = {"batch": batch}
        row["sample_reference"] = timed(lambda: reference.sample_latents(batch, **sample), device, args.warmup, args.repeats)
        row["sample_engine"] = timed(lambda: engine.sample_latents(batch, **sample), device, args.warmup, args.repeats)
        row["decode_reference"] = timed(lambda: beam_search(reference.decoder, latents, search), device, args.warmup,
                                        args.repeats)
        row["decode_engine"] = timed(lambda: engine.decode(latents, num_beams=args.num_beams,
                                                           max_new_tokens=args.max_new_tokens, progress=False),
                                     device, args.warmup, args.repeats)
        if not args.skip_hf:
            prefix = reference.decoder.prefix(latents).detach()

            def hf_generate():
                with torch.no_grad():
                    reference.decoder.gpt2.generate(
                        inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=device),
                        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                        min_new_tokens=args.max_new_tokens, no_repeat_ngram_size=3, early_stopping=True,
                        do_sample=False, pad_token_id=reference.decoder.pad_token_id)
            row["decode_hf_generate"] = timed(hf_generate, device, args.warmup, args.repeats)
        # parity at this batch, same seed and noise: the engine's latents against the reference's, and the text
        # each decodes from its own latents (the target: fp32 within 1e-5 relative, identical text)
        expected, got = reference.sample_latents(batch, **sample), engine.sample_latents(batch, **sample)
        decode = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, progress=False)
        row["parity"] = {"max_rel_err": ((got.float() - expected).abs().max() / expected.abs().max()).item(),
                         "text_identical": engine.decode(got, **decode) == reference.decode(expected, **decode)}
        # end to end = sampling loop + beam decode (medians added; encoding is not part of unconditional generation)
        row["end_to_end_reference"] = {"median_s": row["sample_reference"]["median_s"] + row["decode_reference"]["median_s"]}
        row["end_to_end_engine"] = {"median_s": row["sample_engine"]["median_s"] + row["decode_engine"]["median_s"]}

        tables = sampler_tables(args.sampler, reference.schedule.to("cpu"), steps=args.steps)
        n_steps = tables.num_steps
        flops, bytes_moved = reverse_step_cost(denoiser, batch, engine.dtype.itemsize, tables.multistep)
        floor_s = floor_seconds(flops, bytes_moved, rates)
        per_step = row["sample_engine"]["median_s"] / n_steps
        row["per_step"] = {"flops": flops, "bytes": bytes_moved, "floor_us": floor_s * 1e6, "engine_us": per_step * 1e6,
                           "engine_tflops": flops / per_step / 1e12, "engine_gbs": bytes_moved / per_step / 1e9}
        # the decode per token (random weights never emit EOS: every token of --max-new-tokens runs)
        flops, bytes_moved = decode_token_cost(reference.decoder.gpt2, batch * args.num_beams,
                                               config.n_prefix + args.max_new_tokens, engine.dtype.itemsize)
        per_token = row["decode_engine"]["median_s"] / args.max_new_tokens
        row["decode_per_token"] = {"flops": flops, "bytes": bytes_moved, "engine_us": per_token * 1e6,
                                   "floor_us": floor_seconds(flops, bytes_moved, rates) * 1e6,
                                   "engine_tflops": flops / per_token / 1e12, "engine_gbs": bytes_moved / per_token / 1e9}
        if "decode_hf_generate" in row:  # how far above the same floor Hugging Face runs bounds the possible speedup
            row["decode_per_token"]["hf_us"] = row["decode_hf_generate"]["median_s"] / args.max_new_tokens * 1e6
        row["speedup_sample"] = row["sample_reference"]["median_s"] / row["sample_engine"]["median_s"]
        row["speedup_decode_vs_reference"] = row["decode_reference"]["median_s"] / row["decode_engine"]["median_s"]
        if "decode_hf_generate" in row:
            row["speedup_decode_vs_hf"] = row["decode_hf_generate"]["median_s"] / row["decode_engine"]["median_s"]
        row["speedup_end_to_end"] = row["end_to_end_reference"]["median_s"] / row["end_to_end_engine"]["median_s"]
        results["rows"].append(row)
        if args.json:  # after every batch size, so a run cut short by a time limit keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        print(f"batch {batch:4d}: sample {row['sample_reference']['median_s']*1e3:9.1f} -> "
              f"{row['sample_engine']['median_s']*1e3:9.1f} ms ({row['speedup_sample']:.1f}x), "
              f"decode {row['decode_reference']['median_s']*1e3:9.1f} -> {row['decode_engine']['median_s']*1e3:9.1f} ms "
              f"({row['speedup_decode_vs_reference']:.1f}x; vs HF {row.get('speedup_decode_vs_hf', float('nan')):.1f}x), "
              f"step {per_step*1e6:.0f} us vs floor {floor_s*1e6:.0f} us, decode token "
              f"{per_token*1e6:.0f} us vs floor {row['decode_per_token']['floor_us']:.0f} us, latents within "
              f"{row['parity']['max_rel_err']:.1e}, text {'identical' if row['parity']['text_identical'] else 'DIFFERS'}",
              flush=True)


if __name__ == "__main__":
    main()
