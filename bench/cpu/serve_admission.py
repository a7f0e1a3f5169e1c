"""The serving engine's admission, ablated: the source texts of the requests admitted in one iteration encoded as
one batch (as the engine does) against each encoded alone (the engine before `93f35dc`), alternating in one
process on one loaded pipeline.

    python bench/cpu/serve_admission.py MODEL --sources sources.txt [--onnx-int8] [--callers 8]
        [--per-caller 4] [--rounds 2] [--guidance 2] [--json OUT]

MODEL: a text-conditioned checkpoint (reference backend) or, with --onnx-int8, its `ldlm export` folder (int8
graphs). Closed loop: C callers, each submitting its next `generate_from` (DPM-Solver++ 20 steps, beam 4) when
its last returns, sources cycled. Per run: requests/s, p50/p99 latency, the engine's seconds per part of the
loop (EngineStats.seconds), and whether the two ways gave the same texts (first round)."""

from __future__ import annotations

import argparse
import json
import threading
import time

import ldlm
from ldlm.serving.scheduler import StepScheduler

BATCHED = StepScheduler._source_conditions


def one_run(pipe, sources: list[str], batched: bool, callers: int, per_caller: int, settings: dict) -> dict:
    StepScheduler._source_conditions = BATCHED if batched else (lambda self, tickets: {})
    try:
        with ldlm.AsyncEngine(pipe) as engine:
            engine.submit("generate_from", source=sources[0], seed=0, **settings).result()  # warm
            texts, latencies = {}, []

            def caller(c: int) -> None:
                for i in range(per_caller):
                    k = c * per_caller + i
                    start = time.perf_counter()
                    texts[k] = engine.submit("generate_from", source=sources[k % len(sources)], seed=k,
                                             **settings).result()
                    latencies.append(time.perf_counter() - start)

            before = engine.stats().seconds
            start = time.perf_counter()
            threads = [threading.Thread(target=caller, args=(c,)) for c in range(callers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            seconds = {k: v - before[k] for k, v in engine.stats().seconds.items()}
    finally:
        StepScheduler._source_conditions = BATCHED
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    return {"requests_per_s": len(latencies) / wall, "p50_s": pct(0.5), "p99_s": pct(0.99), "wall_s": wall,
            "seconds": seconds, "texts": [texts[k] for k in sorted(texts)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--sources", required=True, help="one source text a line")
    p.add_argument("--onnx-int8", action="store_true", help="MODEL is an export: its int8 graphs, two threads")
    p.add_argument("--callers", type=int, default=8)
    p.add_argument("--per-caller", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--json", help="write the runs here")
    args = p.parse_args()
    with open(args.sources) as f:
        sources = [line.strip() for line in f if line.strip()]
    options = ldlm.OnnxOptions(int8_reverse=True, int8_decoder=True, intra_op_threads=2) if args.onnx_int8 else None
    pipe = ldlm.load(args.model, onnx_options=options)
    settings = {"sampler": "dpm++2m", "steps": 20, "guidance": args.guidance, "num_beams": 4}
    runs = []
    for round_ in range(args.rounds):
        for way in ("alone", "batched"):
            run = one_run(pipe, sources, way == "batched", args.callers, args.per_caller, settings)
            runs.append({"round": round_, "way": way, **run})
            shares = " ".join(f"{k} {v / run['wall_s']:.0%}" for k, v in run["seconds"].items())
            print(f"{pipe.backend} C={args.callers} round {round_} sources {way}: {run['requests_per_s']:.2f} req/s "
                  f"p50 {run['p50_s']:.2f} s p99 {run['p99_s']:.2f} s; {shares}", flush=True)
    alone, batched = runs[0]["texts"], runs[1]["texts"]
    print(f"texts equal, first round: {sum(a == b for a, b in zip(alone, batched))} of {len(alone)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in run.items() if k != "texts"} for run in runs], f, indent=1)


if __name__ == "__main__":
    main()
