"""Every CPU path of the `small` default side by side, in one run (issue 20): the eager reference, the compiled
backend (torch.compile of the reference modules), ONNX Runtime fp32 and int8, and AOTInductor packages.

    python bench/cpu/cpu_paths.py --workdir runs/cpu-paths [--threads 1 2] [--json table.json]
    python bench/cpu/cpu_paths.py --workdir . --model CKPT --onnx CKPT_ONNX --aoti CKPT_AOTI   # a trained model's generate(1)

The preset's random weights are saved once as a checkpoint and exported once to ONNX and AOTI (export and
compile seconds reported), then `ldlm bench` runs in a fresh process per thread count and format, so thread
settings never leak between runs. Two settings: the small default's sampler (DPM-Solver++(2M), 20 steps) at
batch 1, 8 and 64, and the design's DDPM 1000 at batch 1 and 8. Random GPT-2 weights never emit EOS: every
decode runs the full 64 tokens (4 beams), a fixed worst case. Steady state is the median (and p90) after one
warm-up run; the warm-up run alone is the first call (compilation for the compiled backend).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"dpm++2m 20": ["--sampler", "dpm++2m", "--steps", "20", "--batch-sizes", "1", "8", "64"],
            "ddpm 1000": ["--sampler", "ddpm", "--batch-sizes", "1", "8"]}


def prepare(workdir: Path) -> dict[str, float]:
    """The preset saved as a checkpoint and its two exports; seconds each export took (0 when already there)."""
    from ldlm.jobs.benchmark import bench_components
    from ldlm.model.checkpoint import save_checkpoint
    from ldlm.export.aoti_export import export_aoti
    from ldlm.export.manifest import is_export
    from ldlm.export.onnx_export import export_checkpoint

    seconds = {}
    if not (workdir / "checkpoint" / "config.json").is_file():
        save_checkpoint(bench_components("small"), workdir / "checkpoint")
    for name, export in (("onnx", lambda: export_checkpoint(workdir / "checkpoint", workdir / "onnx",
                                                            variants=("float32",))),
                         ("aoti", lambda: export_aoti(workdir / "checkpoint", workdir / "aoti"))):
        start = time.perf_counter()
        if not is_export(workdir / name):
            export()
        seconds[name] = time.perf_counter() - start
    return seconds


def bench(workdir: Path, target: str, backends: list[str], threads: int, setting: str, iters: int) -> list[dict]:
    out = workdir / f"{target}-{'-'.join(backends)}-{threads}t-{setting.replace(' ', '')}.json"
    if not out.is_file():
        command = [sys.executable, "-m", "ldlm.cli", "bench", str(workdir / target), "--backends", *backends,
                   "--threads", str(threads), "--iters", str(iters), "--no-progress", "--json", str(out),
                   *SETTINGS[setting], *(["--int8"] if target == "onnx" else [])]
        print(" ".join(command[2:]), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return [{**row, "threads": threads, "setting": setting} for row in json.loads(out.read_text())["rows"]]


SOURCE = "name : The Eagle | Type : coffee shop | food : English | area : city centre"  # a conditional model's


def time_trained(model: Path, onnx: Path, aoti: Path, threads: int, runs: int) -> dict[str, dict]:
    """In this process: generate(1) (generate_from SOURCE for a text-conditioned model) on each path, median and
    p90 of `runs` calls after two warm-up calls, the first of them timed alone."""
    import torch

    import ldlm
    from ldlm.runtimes.onnx_session import OnnxOptions

    torch.set_num_threads(threads)
    loads = {"reference": lambda: ldlm.load(model, backend="reference"),
             "compiled": lambda: ldlm.load(model, backend="compiled"),
             "onnx fp32": lambda: ldlm.load(onnx, onnx_options=OnnxOptions(intra_op_threads=threads)),
             "onnx int8": lambda: ldlm.load(onnx, onnx_options=OnnxOptions(intra_op_threads=threads, int8_reverse=True,
                                                                           int8_decoder=True)),
             "aoti": lambda: ldlm.load(aoti)}
    out = {}
    for name, load in loads.items():
        pipe = load()

        def call(seed: int, pipe=pipe) -> None:
            if pipe.config.condition == "text":
                pipe.generate_from([SOURCE], seed=seed, progress=False)
            else:
                pipe.generate(1, seed=seed, progress=False)

        start = time.perf_counter()
        call(0)
        first = time.perf_counter() - start
        call(1)
        times = []
        for seed in range(runs):
            start = time.perf_counter()
            call(seed + 2)
            times.append(time.perf_counter() - start)
        times.sort()
        out[name] = {"median_s": statistics.median(times), "p90_s": times[int(0.9 * len(times))], "first_call_s": first}
    return out


def trained_latency(model: Path, onnx: Path, aoti: Path, threads: int, runs: int) -> dict[str, dict]:
    """time_trained in a fresh process with `threads` threads (a trained decoder stops at EOS, so the decode is
    as long as the text)."""
    command = [sys.executable, __file__, "--workdir", ".", "--model", str(model), "--onnx", str(onnx), "--aoti",
               str(aoti), "--runs", str(runs), "--worker-threads", str(threads)]
    result = subprocess.run(command, check=True, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads(result.stdout.strip().splitlines()[-1])


def threads_label(threads: int) -> str:
    return f"{threads} thread" + ("s" if threads > 1 else "")


def table(rows: list[dict], threads: list[int]) -> str:
    paths = list(dict.fromkeys(r["backend"] for r in rows))
    head = " | ".join(f"{threads_label(t)} median / p90" for t in threads)
    lines = [f"| setting | batch | stage | path | {head} | first call ({threads[-1]}t) |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in threads) + " | --- |"]
    keyed = {(r["setting"], r["batch"], r["stage"], r["backend"], r["threads"]): r for r in rows}
    for setting in SETTINGS:
        for batch in sorted({r["batch"] for r in rows if r["setting"] == setting}):
            for stage in ("loop", "decode", "end_to_end"):
                for path in paths:
                    cells = []
                    for t in threads:
                        r = keyed.get((setting, batch, stage, path, t))
                        cells.append("-" if r is None else f"{r['median_s'] * 1e3:,.0f} / {r['p90_s'] * 1e3:,.0f} ms")
                    last = keyed.get((setting, batch, stage, path, threads[-1]))
                    first = "-" if last is None or last["first_call_s"] is None else f"{last['first_call_s']:.2f} s"
                    if any(c != "-" for c in cells):
                        lines.append(f"| {setting} | {batch} | {stage} | {path} | {' | '.join(cells)} | {first} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--model", type=Path, help="a trained checkpoint: time its generate(1) on every path too")
    parser.add_argument("--onnx", type=Path, help="--model's ONNX export (`ldlm export`)")
    parser.add_argument("--aoti", type=Path, help="--model's AOTI export (`ldlm export --format aoti`)")
    parser.add_argument("--runs", type=int, default=10, help="timed generate(1) calls of --model per path")
    parser.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)  # trained_latency's worker process
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.worker_threads:
        print(json.dumps(time_trained(args.model, args.onnx, args.aoti, args.worker_threads, args.runs)))
        return
    if args.model:
        trained = {t: trained_latency(args.model, args.onnx, args.aoti, t, args.runs) for t in args.threads}
        print(f"| path | {' | '.join(f'{threads_label(t)} median / p90' for t in args.threads)} | first call |")
        print("| --- | " + " | ".join("---" for _ in args.threads) + " | --- |")
        for path in trained[args.threads[0]]:
            cells = [f"{trained[t][path]['median_s'] * 1e3:.0f} / {trained[t][path]['p90_s'] * 1e3:.0f} ms"
                     for t in args.threads]
            print(f"| {path} | {' | '.join(cells)} | {trained[args.threads[-1]][path]['first_call_s']:.2f} s |")
        if args.json:
            args.json.write_text(json.dumps(trained, indent=2))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    export_seconds = prepare(args.workdir)
    print(f"export seconds: {export_seconds}", flush=True)
    rows = []
    for setting in args.settings:
        for threads in args.threads:
            rows += bench(args.workdir, "checkpoint", ["reference", "compiled"], threads, setting, args.iters)
            rows += bench(args.workdir, "onnx", ["onnx"], threads, setting, args.iters)
            rows += bench(args.workdir, "aoti", ["aoti"], threads, setting, args.iters)
    print(table(rows, args.threads))
    if args.json:
        args.json.write_text(json.dumps({"export_seconds": export_seconds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
