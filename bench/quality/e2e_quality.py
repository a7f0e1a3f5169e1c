"""Train the reference pipeline on E2E and measure it: reconstruction, unconditional samples, variations.

    python bench/quality/e2e_quality.py split --data ../shared/data/e2e/train.jsonl --workdir runs/e2e
    ldlm train --data runs/e2e/train.txt --out runs/e2e/model --preset small --time-budget 2400
    python bench/quality/e2e_quality.py eval --workdir runs/e2e

The held-out split takes whole meaning representations (MRs), as the data's README asks, so no held-out
sentence describes a restaurant record seen in training. Nothing from the corpus is written into the project.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path


def split(data: Path, workdir: Path, holdout_lines: int, seed: int) -> None:
    by_mr = defaultdict(list)
    for line in data.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_mr[record["mr"]].append(" ".join(record["text"].split()))
    mrs = sorted(by_mr)
    random.Random(seed).shuffle(mrs)
    held, train = [], []
    for mr in mrs:
        (held if len(held) < holdout_lines else train).extend((mr, text) for text in by_mr[mr])
    workdir.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("train", train), ("heldout", held)):  # texts alone, and with their MR (conditional)
        (workdir / f"{name}.txt").write_text("".join(text + "\n" for _, text in pairs), encoding="utf-8")
        (workdir / f"{name}.jsonl").write_text("".join(json.dumps({"mr": mr, "text": text}, ensure_ascii=False) + "\n"
                                                       for mr, text in pairs), encoding="utf-8")
    print(f"{len(mrs)} MRs: {len(train)} training lines, {len(held)} held-out lines -> {workdir}")


def evaluate(workdir: Path, num_samples: int, seed: int) -> dict:
    import sacrebleu

    import ldlm

    pipe = ldlm.load(workdir / "model")
    held = (workdir / "heldout.txt").read_text(encoding="utf-8").splitlines()
    results = {"heldout_lines": len(held)}

    start = time.perf_counter()
    recon = pipe.reconstruct(held, progress=False)
    results["reconstruct_seconds"] = time.perf_counter() - start
    results["exact_match"] = sum(a == b for a, b in zip(recon, held)) / len(held)
    results["bleu"] = sacrebleu.corpus_bleu(recon, [held]).score
    results["reconstruction_examples"] = [{"input": a, "output": b} for a, b in zip(held[:10], recon[:10])]

    start = time.perf_counter()
    results["samples"] = pipe.generate(num_samples, seed=seed, progress=False)
    results["generate_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    varied = pipe.vary(held[:num_samples], strength=0.3, seed=seed, progress=False)
    results["vary_seconds"] = time.perf_counter() - start
    results["variations"] = [{"input": a, "output": b} for a, b in zip(held[:num_samples], varied)]
    train_state = workdir / "model" / "training" / "state.json"
    results["training"] = json.loads(train_state.read_text()) if train_state.is_file() else None
    (workdir / "quality.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split", help="hold out whole MRs of E2E; write train.txt and heldout.txt")
    p.add_argument("--data", type=Path, required=True, help="E2E train.jsonl")
    p.add_argument("--workdir", type=Path, required=True, help="output folder (outside the project's tracked files)")
    p.add_argument("--holdout-lines", type=int, default=300, help="at least this many held-out lines (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("eval", help="measure the model trained into WORKDIR/model")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--num-samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "split":
        split(args.data, args.workdir, args.holdout_lines, args.seed)
    else:
        r = evaluate(args.workdir, args.num_samples, args.seed)
        print(f"held-out lines {r['heldout_lines']}: exact match {r['exact_match']:.3f}, BLEU {r['bleu']:.1f}")
        print("unconditional samples:", *(f"  - {s}" for s in r["samples"]), sep="\n")
        print("vary (strength 0.3):", *(f"  > {v['input']}\n    ~ {v['output']}" for v in r["variations"]), sep="\n")


if __name__ == "__main__":
    main()
