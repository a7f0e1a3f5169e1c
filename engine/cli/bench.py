"""`ldlm bench`: latency per stage and end to end, per backend."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ldlm.cli.flags import add_trust_flag
from ldlm.model.config import PRESETS, SAMPLER_NAMES
from ldlm.runtimes.backends import BACKENDS


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="latency per stage (encode, sampling loop, decode) and end to end, per backend")
    p.add_argument("checkpoint", nargs="?", help="checkpoint (or export) directory; omit it to use --preset")
    p.add_argument("--preset", choices=sorted(PRESETS), help="benchmark a preset's sizes with random weights")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["auto"],
                   help="backends to compare (default auto); onnx exports a checkpoint or preset to a temp folder")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64], help="batch sizes (default 1 8 64)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                   help="sampler (default: the checkpoint's own; for --preset, the design's ddpm, 1000 steps)")
    p.add_argument("--steps", type=int, default=None, help="steps of ddim or dpm++2m (default 50 and 20)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="engine dtype (default float32); the reference runs float32 regardless")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch and ONNX Runtime alike (default 0: each library's default)")
    p.add_argument("--int8", action="store_true", help="with onnx: also time its int8 graphs")
    p.add_argument("--onnx-cuda-graph", action="store_true",
                   help="with onnx on CUDA: also time it with the reverse graph as ONNX Runtime CUDA graphs")
    p.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (default 5)")
    p.add_argument("--num-beams", type=int, default=4, help="beams of the decode (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="decode length bound (default 64)")
    add_trust_flag(p)
    load = p.add_argument_group("load test (--load): many callers against one loaded pipeline, served by "
                                "ldlm.AsyncEngine beside today's ways (ldlm.serving.load)")
    load.add_argument("--load", action="store_true",
                      help="run the load test instead of the latency table (a checkpoint or export, its backend)")
    load.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 8, 32, 64],
                      help="closed-loop callers per level (default 1 2 8 32 64)")
    load.add_argument("--rates", type=float, nargs="*", default=[],
                      help="open-loop Poisson arrival rates, requests/s (default none)")
    load.add_argument("--requests", type=int, default=0,
                      help="requests per level (default 0: max(16, 3 x callers); 32 per open-loop rate)")
    load.add_argument("--ways", nargs="+", default=["engine", "threads", "serial"],
                      help="engine, threads (pipe.generate from each caller's thread), serial (one call at a time)")
    load.add_argument("--sources", metavar="FILE",
                      help="a conditional model's sources, one per line (requests cycle through them)")
    load.add_argument("--guidance", type=float, default=None, help="a conditional model's guidance (default: its own)")
    load.add_argument("--max-rows", type=int, default=64, help="the engine's forward rows per iteration (default 64)")
    load.add_argument("--decode", choices=["continuous", "batched"], default=None,
                      help="the engine's beam decode (default batched; ldlm.serving.scheduler)")
    p.add_argument("--json", metavar="FILE", help="write the rows and settings as JSON to FILE")
    p.add_argument("--plot", metavar="FILE", help="draw latency against batch size per backend into FILE (png)")


def cmd_bench(args) -> None:
    import dataclasses
    import importlib.util
    import tempfile

    import torch

    from ldlm.export.manifest import is_export
    from ldlm.inputs import resolve_device
    from ldlm.jobs.benchmark import (BenchSettings, bench_components, bench_pipeline, export_for_bench, format_table,
                                     plot)
    from ldlm.model.checkpoint import load_checkpoint
    from ldlm.pipeline import Pipeline, load
    from ldlm.runtimes.backends import EXPORT_BACKENDS, resolve_backend
    from ldlm.runtimes.onnx_session import OnnxOptions

    if (args.checkpoint is None) == (args.preset is None):
        raise ValueError("give a checkpoint directory or --preset NAME (not both)")
    if args.load:
        return bench_load(args)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'ldlm[bench]' (or drop --plot)")
    sampler = args.sampler or ("ddpm" if args.preset else None)  # a preset's random weights: the design's DDPM
    settings = BenchSettings(batch_sizes=tuple(args.batch_sizes), sampler=sampler, steps=args.steps,
                             warmup=args.warmup, iters=args.iters, num_beams=args.num_beams,
                             max_new_tokens=args.max_new_tokens)
    device = resolve_device(args.device)
    for backend in args.backends:  # fail before any work when a backend cannot run here
        if backend not in EXPORT_BACKENDS and not (args.checkpoint and is_export(args.checkpoint)):
            resolve_backend(backend, device)
    if args.threads < 0:
        raise ValueError(f"--threads must be 0 (the libraries' defaults) or more, got {args.threads}")
    if args.onnx_cuda_graph and ("onnx" not in args.backends or device.type != "cuda"):
        raise ValueError("--onnx-cuda-graph times the onnx backend's CUDA graphs: add onnx to --backends and run "
                         "with --device cuda (onnxruntime-gpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    components = None
    rows = []

    def run(pipe, name: str, dtype: str) -> None:
        name = name if dtype == "float32" else f"{name} {dtype}"
        print(f"benchmarking {name} ({pipe.backend_reason})", file=sys.stderr)
        rows.extend(bench_pipeline(pipe, name, settings, progress=not args.no_progress))

    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            dtype = "float32" if backend in ("reference", "compiled", "aoti") else args.dtype
            options = OnnxOptions(intra_op_threads=args.threads)
            if args.checkpoint and is_export(args.checkpoint):
                path = args.checkpoint
            elif backend in EXPORT_BACKENDS:  # exported here first, untimed
                source = args.checkpoint or components or bench_components(args.preset)
                path = export_for_bench(source, backend, dtype, f"{tmp}/{backend}", int8=args.int8)
            else:
                if components is None:
                    components = load_checkpoint(args.checkpoint) if args.checkpoint else bench_components(args.preset)
                pipe = Pipeline(components, args.device, backend, dtype)
                run(pipe, pipe.backend, dtype)
                continue
            # an export this run wrote in its temporary folder is signed with this user's key
            pipe = load(path, device=args.device, backend=backend, dtype=dtype, onnx_options=options,
                        trust_native_code=args.trust_native_code)
            run(pipe, pipe.backend, dtype)
            if args.int8 and pipe.backend == "onnx":
                int8 = dataclasses.replace(options, int8_reverse=True, int8_decoder=True)
                run(load(path, device=args.device, dtype=dtype, onnx_options=int8), "onnx int8", dtype)
            if args.onnx_cuda_graph and pipe.backend == "onnx":
                graphs = dataclasses.replace(options, cuda_graph=True)
                run(load(path, device=args.device, dtype=dtype, onnx_options=graphs), "onnx cuda-graph", dtype)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2, default=str))
    if args.plot:
        plot(rows, args.plot)


def bench_load(args) -> None:
    """`ldlm bench CHECKPOINT --load`: the load test on the checkpoint's (or export's) first --backends entry."""
    import torch

    from ldlm.inputs import read_user_file
    from ldlm.pipeline import load
    from ldlm.runtimes.onnx_session import OnnxOptions
    from ldlm.serving.load import LoadSettings, LoadTest, format_results, identical_share, results_json

    if args.checkpoint is None:
        raise ValueError("--load runs a trained model: give a checkpoint or export directory (a preset's random "
                         "weights decode to the length bound, which no user sees)")
    if len(args.backends) != 1:
        raise ValueError("--load runs one backend: give one --backends entry")
    sources = ()
    if args.sources:
        sources = tuple(line.strip() for line in read_user_file(args.sources, "--sources", "a text file").decode(
            "utf-8").splitlines() if line.strip())
    if args.threads:
        torch.set_num_threads(args.threads)
    options = OnnxOptions(intra_op_threads=args.threads, int8_reverse=args.int8, int8_decoder=args.int8)
    pipe = load(args.checkpoint, device=args.device, backend=args.backends[0], onnx_options=options,
                trust_native_code=args.trust_native_code)
    settings = LoadSettings(concurrency=tuple(args.concurrency), rates=tuple(args.rates), requests=args.requests,
                            sampler=args.sampler or "dpm++2m", steps=args.steps or 20, num_beams=args.num_beams,
                            guidance=args.guidance, sources=sources, ways=tuple(args.ways), max_rows=args.max_rows,
                            decode=args.decode)
    print(f"load test of {args.checkpoint} on {pipe.backend} ({pipe.backend_reason})", file=sys.stderr)
    test = LoadTest(pipe, settings, progress=not args.no_progress)
    results = test.run()
    print(format_results(results))
    parity = {}
    if "engine" in settings.ways:
        same, compared = identical_share(test)
        parity = {"identical": same, "compared": compared}
        print(f"engine ({test.decode} decode) texts identical to their lone Pipeline call: {same} of {compared} "
              "compared")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "backend": pipe.backend, "decode": test.decode,
                                               "parity": parity,
                                               "results": results_json(results)}, indent=2, default=str))


# the command each parser of this group runs
COMMANDS = {"bench": cmd_bench}
