"""The onnx backend against the reference PyTorch path on the CPU, in one run: speed, parity, int8's cost.

    python bench/cpu/onnx_cpu.py --checkpoint CKPT --export-dir EXPORT [--texts heldout.txt] --json out.json

Exports CKPT to EXPORT first when EXPORT has no manifest. Measures, at each --batch-sizes:
  - the sampling loop (DDPM, --steps steps): reference vs onnx fp32 vs onnx with the int8 reverse transformer;
  - the beam decode (4 beams, up to --max-new-tokens) of the reference's latents: reference vs onnx fp32.
Each figure is the median over --repeats after one warm-up; compare them as ratios (same process, same cores).
Parity, fp32: the same seed and noise give latents within 1e-5 relative and identical texts (samples, and
reconstructions of --texts). int8: its latents' error against fp32 and how many decoded texts stay the same.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import ldlm
from ldlm.export.manifest import is_export
from ldlm.export.onnx_export import export_checkpoint
from ldlm.runtimes.onnx_session import OnnxOptions


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-run allocations and ORT's lazy initialization stay out of the figure
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="trained checkpoint (the reference path)")
    parser.add_argument("--export-dir", required=True, help="its export (written here first if missing)")
    parser.add_argument("--texts", help="texts to reconstruct for the parity check, one per line (first 16 used)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=1000, help="DDPM steps of the timed loop (default 1000)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    parser.add_argument("--json", help="write all figures to this file")
    args = parser.parse_args()

    if not is_export(args.export_dir):
        export_checkpoint(args.checkpoint, args.export_dir)
    reference = ldlm.load(args.checkpoint, backend="reference")
    fp32 = ldlm.load(args.export_dir, onnx_options=OnnxOptions(intra_op_threads=args.threads))
    int8 = ldlm.load(args.export_dir, onnx_options=OnnxOptions(intra_op_threads=args.threads, int8_reverse=True))
    quiet = {"progress": False}
    result = {"machine": f"{platform.node()} ({torch.get_num_threads()} torch threads)", "torch": torch.__version__,
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent).stdout.strip(),
              "checkpoint": args.checkpoint, "steps": args.steps, "backend": fp32.backend_reason, "rows": []}

    # --- parity (fp32) and int8's effect, on 8 samples of the full DDPM loop ---------------------------
    sample = {"n": 8, "seed": 0, **quiet}
    ref_latents, onnx_latents, int8_latents = (p.sample_latents(**sample) for p in (reference, fp32, int8))
    ref_texts, onnx_texts, int8_texts = (p.decode(z, **quiet) for p, z in
                                         ((reference, ref_latents), (fp32, onnx_latents), (fp32, int8_latents)))
    parity = {"latent_rel_err_fp32": rel_err(onnx_latents, ref_latents), "texts_identical_fp32": onnx_texts == ref_texts,
              "latent_rel_err_int8": rel_err(int8_latents, ref_latents),
              "int8_texts_same_as_fp32": sum(a == b for a, b in zip(int8_texts, ref_texts)), "n": 8,
              "texts": [{"reference": a, "onnx": b, "int8": c} for a, b, c in zip(ref_texts, onnx_texts, int8_texts)]}
    if args.texts:
        lines = [line.strip() for line in Path(args.texts).read_text().splitlines() if line.strip()][:16]
        parity["reconstructions_identical_fp32"] = fp32.reconstruct(lines, **quiet) == reference.reconstruct(lines, **quiet)
        parity["encoder_rel_err_fp32"] = rel_err(fp32.encode(lines), reference.encode(lines))
    result["parity"] = parity

    # --- speed ------------------------------------------------------------------------------------------
    for batch in args.batch_sizes:
        loop = {"n": batch, "seed": 1, "sampler": "ddpm", "batch_size": batch, **quiet}
        if args.steps != 1000:
            loop = {**loop, "sampler": "ddim", "steps": args.steps}
        row = {"batch": batch}
        for name, pipe in (("reference", reference), ("onnx_fp32", fp32), ("onnx_int8", int8)):
            row[f"loop_{name}_s"] = median_seconds(lambda p=pipe: p.sample_latents(**loop), args.repeats)
        latents = reference.sample_latents(**{**loop, "sampler": "ddim", "steps": 20})
        for name, pipe in (("reference", reference), ("onnx_fp32", fp32)):
            row[f"decode_{name}_s"] = median_seconds(
                lambda p=pipe: p.decode(latents, max_new_tokens=args.max_new_tokens, batch_size=batch, **quiet),
                args.repeats)
        row["loop_speedup_fp32"] = row["loop_reference_s"] / row["loop_onnx_fp32_s"]
        row["loop_speedup_int8"] = row["loop_reference_s"] / row["loop_onnx_int8_s"]
        row["decode_speedup_fp32"] = row["decode_reference_s"] / row["decode_onnx_fp32_s"]
        result["rows"].append(row)
        print(json.dumps(row))

    print(f"\nparity (fp32, DDPM {1000} steps, 8 samples): latents rel. err {parity['latent_rel_err_fp32']:.2e}, "
          f"texts identical: {parity['texts_identical_fp32']}"
          + (f", reconstructions identical: {parity['reconstructions_identical_fp32']}" if args.texts else ""))
    print(f"int8 reverse: latents rel. err {parity['latent_rel_err_int8']:.2e}, "
          f"{parity['int8_texts_same_as_fp32']}/8 texts as fp32")
    print("\n| batch | loop reference | loop onnx fp32 | loop onnx int8 | fp32 speedup | int8 speedup "
          "| decode reference | decode onnx | decode speedup |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        print(f"| {r['batch']} | {r['loop_reference_s']:.2f} s | {r['loop_onnx_fp32_s']:.2f} s | "
              f"{r['loop_onnx_int8_s']:.2f} s | {r['loop_speedup_fp32']:.2f}x | {r['loop_speedup_int8']:.2f}x | "
              f"{r['decode_reference_s']:.2f} s | {r['decode_onnx_fp32_s']:.2f} s | {r['decode_speedup_fp32']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
