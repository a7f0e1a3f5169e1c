"""Story continuation on ROCStories: the first sentence as the source, the rest of the story as the text, against
the same-size GPT-2 trained to continue the same first sentence (issue 18).

    python bench/quality/roc_conditional.py split --data ../shared/data/roc --workdir runs/roc-cond
    cd runs/roc-cond
    ldlm train --data train.jsonl --source-field source --out cond --preset small --max-text-tokens 80 --latent-tokens 1 \\
        --time-budget 0 --decoder-steps 1000 --diffusion-steps 1000 --decoding nucleus --top-p 0.95
    ldlm baseline train --data train.jsonl --source-field source --out lm --preset small --max-text-tokens 112 \\
        --time-budget 0 --steps 1300
    python bench/quality/roc_conditional.py eval --workdir . --model cond --baseline lm --guidance 1 2 3 --seeds 0 1

Scoring follows `ldlm eval`'s protocol on the held-out stories (valid.txt): they are shuffled by the seed and
halved; every row continues the first half's first sentences, and is scored against the second half's true
continuations (MAUVE on MiniLM sentence features, same count on both sides), with Div, Mem against the training
continuations, mean length and the unknown-word rate. The human row is the first half's own continuations.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

from ldlm.evaluation import metrics

FIRST_SENTENCE = re.compile(r"^(.+?[.!?][\"')]*)\s+(\S.*)$")


def split_story(story: str) -> tuple[str, str] | None:
    """(first sentence, the rest), or None for a story whose first sentence has no end."""
    match = FIRST_SENTENCE.match(" ".join(story.split()))
    return (match.group(1), match.group(2)) if match else None


def read_pairs(path: Path) -> list[tuple[str, str]]:
    stories = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = [p for p in map(split_story, stories) if p is not None]
    print(f"{path}: {len(stories)} stories, {len(stories) - len(pairs)} without a first-sentence boundary (skipped)")
    return pairs


def split(data: Path, workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    for name, file in (("train", "train.txt"), ("heldout", "valid.txt")):
        pairs = read_pairs(data / file)
        (workdir / f"{name}.jsonl").write_text(
            "".join(json.dumps({"source": s, "text": t}, ensure_ascii=False) + "\n" for s, t in pairs),
            encoding="utf-8")


def load_split(workdir: Path, seed: int) -> tuple[list[str], list[str], list[str], list[str]]:
    """(sources to continue, their own continuations, the continuations scored against, training continuations)."""
    held = [json.loads(line) for line in (workdir / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    random.Random(seed).shuffle(held)
    n = len(held) // 2
    train = [json.loads(line)["text"] for line in (workdir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    return ([r["source"] for r in held[:n]], [r["text"] for r in held[:n]],
            [r["text"] for r in held[n : 2 * n]], train)


def score(samples: list[str], reference_features, train: list[str], encoder, seed: int) -> dict:
    from ldlm.evaluation.evaluate import sample_scores

    return sample_scores(samples, reference_features, train, encoder, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split", help="write train.jsonl and heldout.jsonl (source = first sentence, text = rest)")
    p.add_argument("--data", type=Path, required=True, help="the folder with train.txt and valid.txt")
    p.add_argument("--workdir", type=Path, required=True)
    p = sub.add_parser("eval", help="continue held-out first sentences and score the continuations")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--model", type=Path, help="a text-conditional ldlm checkpoint")
    p.add_argument("--baseline", type=Path, help="a conditional `ldlm baseline` model")
    p.add_argument("--guidance", type=float, nargs="+", default=[2.0], help="guidance weights to sweep")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (each also reshuffles the halves)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus threshold for both systems' decoders")
    p.add_argument("--output", type=Path, help="write rows and examples as JSON here")
    args = parser.parse_args()
    if args.command == "split":
        split(args.data, args.workdir)
        return

    import ldlm
    from ldlm.training.baseline import generate_from_language_model
    from ldlm.model.config import DEFAULT_ENCODER
    from ldlm.model.encoder import LatentEncoder
    from ldlm.evaluation.evaluate import features

    encoder = LatentEncoder.from_pretrained(DEFAULT_ENCODER)
    pipe = ldlm.load(args.model) if args.model else None
    rows: dict[str, list[dict]] = {}
    examples: dict[str, list[tuple[str, str]]] = {}

    def add(name: str, seed: int, sources: list[str], texts: list[str], ref_features, train, seconds=None):
        row = {"seed": seed, **score(texts, ref_features, train, encoder, seed), "seconds": seconds}
        rows.setdefault(name, []).append(row)
        examples.setdefault(name, list(zip(sources[:10], texts[:10])))
        print(f"{name} seed {seed}: {row}", flush=True)

    for seed in args.seeds:
        sources, own, scored_against, train = load_split(args.workdir, seed)
        ref_features = features(encoder, scored_against)
        add("human (held-out continuations)", seed, sources, own, ref_features, train)
        for w in args.guidance if pipe else []:
            start = time.perf_counter()
            texts = pipe.generate_from(sources, guidance=w, seed=seed, decoding="nucleus", top_p=args.top_p,
                                       progress=False)
            add(f"ldlm w={w:g}", seed, sources, texts, ref_features, train, time.perf_counter() - start)
        if args.baseline:
            start = time.perf_counter()
            texts = generate_from_language_model(args.baseline, sources, top_p=args.top_p, seed=seed,
                                                 max_new_tokens=96)
            add(f"GPT-2 nucleus {args.top_p:g}", seed, sources, texts, ref_features, train,
                time.perf_counter() - start)

    print("\n| system | MAUVE (per seed) | Div | Mem | words | unknown words | degenerate |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, per_seed in rows.items():
        mean = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in ("div", "mem", "mean_length",
                                                                        "unknown_words", "degenerate")}
        mauve = ", ".join(f"{r['mauve']:.3f}" for r in per_seed)
        print(f"| {name} | {mauve} | {mean['div']:.3f} | {mean['mem']:.3f} | {mean['mean_length']:.1f} | "
              f"{100 * mean['unknown_words']:.2f}% | {100 * mean['degenerate']:.1f}% |")
    for name, pairs in examples.items():
        print(f"\n{name} (seed {args.seeds[0]}):")
        for source, text in pairs[:5]:
            print(f"  {source} -> {text}")
    if args.output:
        args.output.write_text(json.dumps({"rows": rows, "examples": examples}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
