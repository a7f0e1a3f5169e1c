"""The beam search's bookkeeping in ldlm's C kernel against its torch operations, on an export, in one run.

    python bench/native_beam.py EXPORT [--int8] [--threads 2] [--batch-sizes 1 8 64]
    python bench/native_beam.py EXPORT --end-to-end    # generate(1) and generate(8): plain fp32 ONNX against
                                                       # fp32 and int8 with the C kernel, runs interleaved

Per batch size: the decode (64 tokens at most, 4 beams) with the torch bookkeeping and with the C kernel, the
same latents, median of the runs, texts asserted identical; then `generate(1)` end to end (sampler and steps
of the export's checkpoint) with each, and with --source, `generate_from([SOURCE])`."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import ldlm
from ldlm.onnx_runtime import OnnxOptions


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def end_to_end(args) -> None:
    """generate(n) three ways, the calls interleaved so the shared machine's drift falls on all alike."""
    threads = args.threads
    variants = {"onnx fp32, torch bookkeeping": OnnxOptions(intra_op_threads=threads, native_beam_update=False),
                "onnx fp32, C kernel": OnnxOptions(intra_op_threads=threads),
                "onnx int8, C kernel": OnnxOptions(intra_op_threads=threads, int8_reverse=True, int8_decoder=True)}
    pipes = {name: ldlm.load(args.export, onnx_options=options) for name, options in variants.items()}
    rows = []
    print("| n | path | median | against plain fp32 |\n| --- | --- | --- | --- |")
    for n in (1, 8):
        times = {name: [] for name in pipes}
        for pipe in pipes.values():
            pipe.generate(n, progress=False)  # warm-up
        for _ in range(args.runs):
            for name, pipe in pipes.items():
                start = time.perf_counter()
                pipe.generate(n, progress=False)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["onnx fp32, torch bookkeeping"])
        for name, values in times.items():
            ms = statistics.median(values) * 1e3
            rows.append({"n": n, "path": name, "ms": ms})
            print(f"| {n} | {name} | {ms:,.0f} ms | {base * 1e3 / ms:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export")
    parser.add_argument("--int8", action="store_true", help="the int8 reverse transformer and decoder step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--source", help="a conditional export: also time generate_from([SOURCE])")
    parser.add_argument("--end-to-end", action="store_true",
                        help="instead: generate(n) for n in 1 and 8, fp32 with the torch bookkeeping (plain ONNX) "
                        "against fp32 and int8 with the C kernel, each run in turn")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.end_to_end:
        return end_to_end(args)
    pipes = {name: ldlm.load(args.export, onnx_options=OnnxOptions(
        intra_op_threads=args.threads, int8_reverse=args.int8, int8_decoder=args.int8, native_beam_update=native))
        for name, native in (("torch", False), ("native", True))}
    print(pipes["native"].backend_reason)
    latents = pipes["native"].sample_latents(max(args.batch_sizes), seed=0, progress=False)
    rows = []
    for batch in args.batch_sizes:
        x = latents[:batch]
        texts = {name: pipe.decode(x, progress=False) for name, pipe in pipes.items()}
        assert texts["torch"] == texts["native"], f"batch {batch}: the two bookkeepings decoded different texts"
        runs = args.runs if batch < 64 else max(1, args.runs // 2)
        ms = {name: median_ms(lambda p=pipe: p.decode(x, progress=False), runs) for name, pipe in pipes.items()}
        rows.append({"stage": "decode", "batch": batch, **ms})
    ms = {name: median_ms(lambda p=pipe: p.generate(1, progress=False), args.runs) for name, pipe in pipes.items()}
    rows.append({"stage": "generate(1)", "batch": 1, **ms})
    if args.source:
        ms = {name: median_ms(lambda p=pipe: p.generate_from([args.source], progress=False), args.runs)
              for name, pipe in pipes.items()}
        rows.append({"stage": "generate_from one source", "batch": 1, **ms})
    print("| stage | batch | torch bookkeeping | C kernel | speed-up |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['stage']} | {r['batch']} | {r['torch']:,.0f} ms | {r['native']:,.0f} ms | "
              f"{r['torch'] / r['native']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
