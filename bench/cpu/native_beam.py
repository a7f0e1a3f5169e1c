"""The beam search's bookkeeping in ldlm's C kernel against its torch operations, on an export, in one run.

    python bench/cpu/native_beam.py EXPORT [--int8] [--threads 2] [--batch-sizes 1 8 64]
    python bench/cpu/native_beam.py EXPORT --end-to-end    # generate(1) and generate(8): plain fp32 ONNX against
                                                       # fp32 and int8 with the C kernel
    python bench/cpu/native_beam.py EXPORT --against OLD   # two exports of one checkpoint (say, before and after a
                                                       # change to the graphs), both with the C kernel

Per batch size: the decode (64 tokens at most, 4 beams) with the torch bookkeeping and with the C kernel, the
same latents, median of the runs, texts asserted identical; then `generate(1)` end to end (sampler and steps
of the export's checkpoint) with each, and with --source, `generate_from([SOURCE])`.

Variants are timed in alternating blocks, each opened by an untimed call: call by call interleaving would
time one pipeline while another's ONNX Runtime pool still spins after its reverse graph (the sampling loop's
sessions spin, ldlm.runtimes.onnx_runtime.Graph), which on two cores slowed the sampling loop 1.8x in a trial."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

import ldlm
from ldlm.runtimes.onnx_session import OnnxOptions


def timed_blocks(fns: dict[str, Callable[[], object]], runs: int, blocks: int = 3) -> dict[str, float]:
    """Median milliseconds of each fn over `runs` calls, in `blocks` rounds of one block per fn, each block
    opened by an untimed call (the warm-up, and the end of the previous block's spinning threads)."""
    times = {name: [] for name in fns}
    per_block = max(1, -(-runs // blocks))
    for _ in range(blocks):
        for name, fn in fns.items():
            fn()
            for _ in range(per_block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def end_to_end(args) -> None:
    """generate(n) three ways."""
    threads = args.threads
    variants = {"onnx fp32, torch bookkeeping": OnnxOptions(intra_op_threads=threads, native_beam_update=False),
                "onnx fp32, C kernel": OnnxOptions(intra_op_threads=threads),
                "onnx int8, C kernel": OnnxOptions(intra_op_threads=threads, int8_reverse=True, int8_decoder=True)}
    pipes = {name: ldlm.load(args.export, onnx_options=options) for name, options in variants.items()}
    rows = []
    print("| n | path | median | against plain fp32 |\n| --- | --- | --- | --- |")
    for n in (1, 8):
        ms = timed_blocks({name: lambda p=pipe: p.generate(n, progress=False) for name, pipe in pipes.items()},
                          args.runs)
        base = ms["onnx fp32, torch bookkeeping"]
        for name, value in ms.items():
            rows.append({"n": n, "path": name, "ms": value})
            print(f"| {n} | {name} | {value:,.0f} ms | {base / value:.2f}x |")
    write_json(args, rows)


def against(args) -> None:
    """Two exports of one checkpoint, both with the C kernel: decode, sampling loop and generate(1)."""
    options = OnnxOptions(intra_op_threads=args.threads, int8_reverse=args.int8, int8_decoder=args.int8)
    pipes = {name: ldlm.load(path, onnx_options=options) for name, path in (("this", args.export),
                                                                             ("against", args.against))}
    latents = pipes["this"].sample_latents(max(args.batch_sizes), seed=0, progress=False)
    rows = []
    for batch in args.batch_sizes:
        x = latents[:batch]
        texts = {name: pipe.decode(x, progress=False) for name, pipe in pipes.items()}
        same = sum(a == b for a, b in zip(texts["this"], texts["against"]))
        # fp32 graphs that compute the same function decode the same texts; int8 ones quantize activations
        # per call, where a last-bit difference can move a value across a step
        assert args.int8 or same == batch, f"batch {batch}: fp32 exports decoded {batch - same} texts differently"
        runs = args.runs if batch < 64 else max(1, args.runs // 2)
        ms = timed_blocks({name: lambda p=pipe: p.decode(x, progress=False) for name, pipe in pipes.items()}, runs)
        rows.append({"stage": "decode", "batch": batch, "identical": f"{same} of {batch}", **ms})
    for stage, call in (("loop", lambda p: p.sample_latents(1, progress=False)),
                        ("generate(1)", lambda p: p.generate(1, progress=False))):
        ms = timed_blocks({name: lambda p=pipe: call(p) for name, pipe in pipes.items()}, args.runs)
        rows.append({"stage": stage, "batch": 1, "identical": "", **ms})
    print(f"| stage | batch | {args.export} | {args.against} | speed-up | texts identical |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['stage']} | {r['batch']} | {r['this']:,.0f} ms | {r['against']:,.0f} ms | "
              f"{r['against'] / r['this']:.2f}x | {r['identical']} |")
    write_json(args, rows)


def write_json(args, rows: list[dict]) -> None:
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
                        "against fp32 and int8 with the C kernel")
    parser.add_argument("--against", help="instead: this export against another of the same checkpoint")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.end_to_end:
        return end_to_end(args)
    if args.against:
        return against(args)
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
        ms = timed_blocks({name: lambda p=pipe: p.decode(x, progress=False) for name, pipe in pipes.items()}, runs)
        rows.append({"stage": "decode", "batch": batch, **ms})
    ms = timed_blocks({name: lambda p=pipe: p.generate(1, progress=False) for name, pipe in pipes.items()}, args.runs)
    rows.append({"stage": "generate(1)", "batch": 1, **ms})
    if args.source:
        ms = timed_blocks({name: lambda p=pipe: p.generate_from([args.source], progress=False)
                           for name, pipe in pipes.items()}, args.runs)
        rows.append({"stage": "generate_from one source", "batch": 1, **ms})
    print("| stage | batch | torch bookkeeping | C kernel | speed-up |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['stage']} | {r['batch']} | {r['torch']:,.0f} ms | {r['native']:,.0f} ms | "
              f"{r['torch'] / r['native']:.2f}x |")
    write_json(args, rows)


if __name__ == "__main__":
    main()
