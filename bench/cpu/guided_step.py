"""A guided step of a cross-attention model on its ONNX export, where the condition's length costs: one reverse
graph run over the padded guided batch against the null rows run apart, and the guided loop of a `Pipeline` call.

    python bench/cpu/guided_step.py EXPORT --sources sources.txt [--batches 1 2 4 8 64] [--threads 2] [--json OUT]

EXPORT: an `ldlm export` folder of a text-conditioned model (its int8 reverse graph is timed). An export with the
`condition_kv` graph reads each source's keys and values, projected once per run; one made before that graph
projects every condition token at every step, padding included, so a guided batch's null rows (one token)
cost as much as the sources they are padded to. Per batch B (2B rows: the sources' and the null ones):
- `tokens`: how much of a run the sources' tokens take (B rows reading the sources, as a run reads them,
  against B null rows);
- `one run` / `apart`: the padded guided batch in one run, and with its null rows run apart (OnnxReverse's
  split, taken on the CPU where it pays);
- `loop`: `sample_latents(B, sources=..., guidance=2)`, DPM-Solver++(2M) 20 steps, median of the runs.
Sources: one per line (E2E's MRs: about 40 MiniLM tokens); the first B are used."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import ldlm
from ldlm.model.reverse import Condition
from ldlm.runtimes.onnx_session import OnnxOptions
from ldlm.sampling.guidance import encode_condition


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(pipe, sources: list[str], batch: int, runs: int) -> dict:
    reverse = pipe.reverse
    # as a sampling run reads it: projected once where the export has condition_kv, else the tokens
    condition = reverse.project_condition(encode_condition(reverse, pipe.encoder, sources=sources[:batch],
                                                           device=pipe.device))
    x = torch.randn(2 * batch, *pipe.config.latent_shape)
    t = torch.full((2 * batch,), 500.0)
    guided = Condition.cat([condition, reverse.project_condition(reverse.null(batch))])
    row = {"batch": batch, "length": condition.tokens.shape[1], "projected": guided.projected,
           "splits": reverse._length_groups(guided, x.device) is not None,
           "sources_ms": median_ms(lambda: reverse(x[:batch], t[:batch], condition=condition), runs),
           "null_ms": median_ms(lambda: reverse(x[:batch], t[:batch], condition=reverse.null(batch)), runs),
           "one_run_ms": median_ms(lambda: reverse._run(x, t, None, guided), runs),
           "apart_ms": median_ms(lambda: reverse(x, t, condition=guided), runs)}
    kwargs = {"sources": sources[:batch], "sampler": "dpm++2m", "steps": 20, "guidance": 2.0, "seed": 0,
              "progress": False}
    row["loop_ms"] = median_ms(lambda: pipe.sample_latents(batch, **kwargs), max(3, runs // 5))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", type=Path)
    parser.add_argument("--sources", type=Path, required=True, help="source texts, one per line")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 64])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime's and torch's threads")
    parser.add_argument("--runs", type=int, default=15, help="timed runs of a step (a fifth of them for the loop)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sources = args.sources.read_text(encoding="utf-8").splitlines()
    if len(sources) < max(args.batches):
        raise SystemExit(f"{args.sources} holds {len(sources)} sources; --batches asks for {max(args.batches)}")
    pipe = ldlm.load(args.export, onnx_options=OnnxOptions(int8_reverse=True, int8_decoder=True,
                                                          intra_op_threads=args.threads))
    rows = []
    for batch in args.batches:
        row = measure(pipe, sources, batch, args.runs if batch < 32 else max(3, args.runs // 3))
        rows.append(row)
        print(f"B={batch} L={row['length']} projected={row['projected']}: the sources' tokens "
              f"{1 - row['null_ms'] / row['sources_ms']:.0%} of a run; guided step one run {row['one_run_ms']:.1f} ms, "
              f"null rows apart {row['apart_ms']:.1f} ms (split taken: {row['splits']}); loop {row['loop_ms']:.0f} ms",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"export": str(args.export), "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
