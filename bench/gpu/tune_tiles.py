"""Tune ldlm.kernels.fused_linear's tiles once per shape on a GPU and store them (issue 21): no run autotunes.

    python bench/gpu/tune_tiles.py --preset base --out tiles.json --budget-s 300     # on the GPU
    python bench/gpu/tune_tiles.py --merge kernels/tiles.json tiles.json --out kernels/tiles.json   # here, to commit
    TRITON_INTERPRET=1 python bench/gpu/tune_tiles.py --preset tiny --device cpu --rows 2 --reps 1 \\
        --max-candidates 2 --out /tmp/tiles.json                                  # smoke (figures meaningless)

The shapes are the engine's own: one sampling step of the fused-blocks reverse transformer (per batch in
--rows) and one beam-decode token of the fused-blocks GPT-2 (4 beams: rows = 4 x batch), recorded by running
them with the kernel replaced by a recorder, so a new layer or option is tuned without listing it here. Per
shape, dtype and weight format, each candidate tiling (rows 16-64 a program, columns 64 or 128, K steps of 64
or 128, split-K 1-8 where no GELU follows, 4 or 8 warps) is checked against torch's modules and timed by CUDA
events (median of --reps runs after a warm-up); the fastest is written with its time and the untuned rule's.
Shapes go most important first (bf16, the sampling step, batch 64) and the JSON is rewritten after each, so
--budget-s (or a time limit) keeps what was tuned.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ldlm.jobs.benchmark import bench_components
from ldlm.fast.folded_reverse import FoldedReverse
from ldlm.kernels.reference import modules_linear
from ldlm.kernels.fused_linear import Fp8Linear, Tiles, default_tiles, fused_linear
from ldlm.kernels.tile_table import FORMAT, merge, shape_key
from ldlm.fast.static_gpt2 import StaticKVGPT2

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@dataclass(frozen=True)
class Shape:
    """One fused_linear launch as the engine makes it."""

    where: str  # "step" (the sampling loop) or "decode" (a beam-decode token)
    rows: int
    n: int
    k: int
    gelu: bool | str
    norm: bool
    residual: bool
    conv1d: bool  # GPT-2's Conv1D layout (weight (K, N))


def engine_shapes(preset: str, rows: list[int], beams: int = 4) -> list[Shape]:
    """Every distinct fused_linear launch of a sampling step at each batch in `rows`, and of a decode token at
    each batch (batch x beams rows), in launch order."""
    from transformers.pytorch_utils import Conv1D

    components = bench_components(preset)
    seen: dict[Shape, None] = {}

    def recorder(where: str):
        def record(x, linear, *, norm=None, gelu=False, residual=None):
            weight = linear.weight
            n, k = (weight.shape[1], weight.shape[0]) if isinstance(linear, Conv1D) else weight.shape
            seen[Shape(where, x.reshape(-1, x.shape[-1]).shape[0], n, k, gelu, norm is not None,
                       residual is not None, isinstance(linear, Conv1D))] = None
            return modules_linear(x, linear, norm=norm, gelu=gelu, residual=residual)
        return record

    reverse, gpt2 = components.reverse.eval(), components.decoder.gpt2.eval()
    cfg = reverse.config
    with torch.no_grad():
        for batch in rows:
            folded = FoldedReverse(reverse, torch.tensor([999.0]), fused_blocks=True)
            folded.linear = recorder("step")
            folded(torch.zeros(batch, *cfg.latent_shape), torch.zeros(1, dtype=torch.long))
        for batch in rows:
            model = StaticKVGPT2(gpt2, rows=batch * beams, max_len=cfg.n_prefix + 2, fused_blocks=True)
            model.linear = recorder("decode")
            model.prefill(torch.zeros(batch, cfg.n_prefix, cfg.n_embd), repeats=beams)
            model.step(torch.zeros(batch * beams, dtype=torch.long), torch.tensor(cfg.n_prefix))
    return list(seen)


def candidates(shape: Shape, device: torch.device, limit: int | None = None,
               multiprocessors: int | None = None) -> list[Tiles]:
    """Tilings worth timing for `shape`: the untuned rule's first (for `multiprocessors`, default the
    device's), then rows a program up to the shape's (tl.dot takes 16 at least), 64 or 128 columns and K steps,
    split-K where no GELU follows and K allows it, 4 or 8 warps for the larger tiles."""
    default = default_tiles(shape.rows, shape.n, shape.k, device=device, gelu=shape.gelu, gpu="(untuned)",
                            multiprocessors=multiprocessors)
    found = [default]
    max_m = max(16, 1 << max(0, shape.rows - 1).bit_length())
    for bm, bn, bk, split, warps in itertools.product((16, 32, 64), (64, 128), (64, 128), (1, 2, 4, 8), (4, 8)):
        k_tiles = -(-shape.k // bk)
        if bm > max_m or (shape.gelu and split > 1) or split > k_tiles or (warps == 8 and bm * bn < 64 * 128):
            continue
        tiles = Tiles(bm, bn, bk, split, warps)
        if tiles not in found:
            found.append(tiles)
    return found[:limit] if limit else found


def build(shape: Shape, dtype: torch.dtype, fp8: bool, device: torch.device, seed: int = 0):
    """Random modules and inputs at `shape`: (x, linear, norm, residual)."""
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(seed)
    linear = Conv1D(shape.n, shape.k) if shape.conv1d else torch.nn.Linear(shape.k, shape.n)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * shape.k**-0.5)
    linear = linear.to(device, dtype)
    if fp8:
        linear = Fp8Linear(linear)
    norm = torch.nn.LayerNorm(shape.k).to(device, dtype) if shape.norm else None
    x = torch.randn(shape.rows, shape.k, generator=g).to(device, dtype)
    residual = torch.randn(shape.rows, shape.n, generator=g).to(device, dtype) if shape.residual else None
    return x, linear, norm, residual


def median_us(fn, device: torch.device, reps: int) -> float:
    """Median time of fn() in microseconds over `reps` runs after one warm-up (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def tune_shape(shape: Shape, dtype: torch.dtype, fp8: bool, device: torch.device, reps: int,
               limit: int | None) -> dict:
    """The fastest correct candidate for one shape: its Tiles' fields, its time, the untuned rule's time."""
    x, linear, norm, residual = build(shape, dtype, fp8, device)
    kwargs = {"norm": norm, "gelu": shape.gelu, "residual": residual}
    with torch.no_grad():
        expected = modules_linear(x, linear, **kwargs).float()
        scale = expected.abs().max().item()
        timed = []
        for tiles in candidates(shape, device, limit):
            got = fused_linear(x, linear, tiles=tiles, **kwargs).float()
            if not (got - expected).abs().max().item() <= TOLERANCE[dtype] * scale:
                continue  # a tiling the kernel gets wrong is never stored (none should be)
            timed.append((median_us(lambda tiles=tiles: fused_linear(x, linear, tiles=tiles, **kwargs), device, reps),
                          tiles))
    if not timed:
        raise RuntimeError(f"no tiling of {shape} matched torch's modules in {dtype}")
    default_us = timed[0][0]  # candidates() puts the untuned rule first
    best_us, best = min(timed, key=lambda pair: pair[0])
    return {**asdict(best), "us": round(best_us, 2), "default_us": round(default_us, 2), "rows": shape.rows,
            "where": shape.where, "candidates": len(timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 1, 256, 8], help="batches, most important first")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    parser.add_argument("--no-fp8", action="store_true", help="skip the float8-weight shapes (the sampling step's)")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--max-candidates", type=int, default=None, help="time at most this many tilings a shape")
    parser.add_argument("--budget-s", type=float, default=None, help="stop starting shapes after this long")
    parser.add_argument("--merge", type=Path, nargs="+", help="instead: merge these tables into --out")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.merge:
        args.out.write_text(json.dumps(merge([json.loads(p.read_text()) for p in args.merge]), indent=1) + "\n")
        return

    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    shapes = engine_shapes(args.preset, args.rows)
    order = {r: i for i, r in enumerate(args.rows)}
    jobs = [(dtype, fp8, s) for dtype in args.dtypes for fp8 in (False, True) for s in shapes
            if not (fp8 and (args.no_fp8 or s.where != "step" or DTYPES[dtype] == torch.float16 or
                             (device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9))))]
    rows_of = {s: next(b for b in args.rows if s.rows in (b, 4 * b)) for s in shapes}
    jobs.sort(key=lambda j: (args.dtypes.index(j[0]), j[2].where != "step", order[rows_of[j[2]]], j[1]))
    table = {"format": FORMAT, "gpus": {gpu: {"fused_linear": {}}}}
    tuned = table["gpus"][gpu]["fused_linear"]
    start = time.perf_counter()
    print(f"{len(jobs)} shapes on {gpu}", flush=True)
    for dtype, fp8, shape in jobs:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: {len(tuned)} of {len(jobs)} shapes tuned", flush=True)
            break
        key = shape_key(shape.rows, shape.n, shape.k, dtype=dtype, gelu=shape.gelu, weights="fp8" if fp8 else "same")
        if key in tuned:  # the same product launched twice (another layer, norm or residual)
            continue
        entry = tune_shape(shape, DTYPES[dtype], fp8, device, args.reps, args.max_candidates)
        tuned[key] = entry
        print(f"{key:<44} {entry['default_us']:8.1f} -> {entry['us']:8.1f} us  "
              f"({entry['block_m']}x{entry['block_n']}x{entry['block_k']}, split {entry['split_k']}, "
              f"{entry['num_warps']} warps; {entry['candidates']} tried)", flush=True)
        args.out.write_text(json.dumps(table, indent=1) + "\n")
    args.out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
