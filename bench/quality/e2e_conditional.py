"""Conditional generation on E2E: meaning representation (MR) -> description, scored as the E2E challenge scores
it, against the same-size GPT-2 trained as a conditional language model (issue 18).

    python bench/quality/e2e_quality.py split --data ../shared/data/e2e/train.jsonl --workdir runs/e2e-cond
    cd runs/e2e-cond
    ldlm train --data train.jsonl --source-field mr --out cross --preset small --time-budget 0 \\
        --decoder-steps 1800 --diffusion-steps 3600
    ldlm baseline train --data train.jsonl --source-field mr --out lm --preset small --time-budget 0 --steps 1800
    python bench/quality/e2e_conditional.py --workdir . --model cross --baseline lm --guidance 0 1 2 3 5 --seeds 5

Every held-out MR (whole MRs: none was seen in training) is generated from once per seed. BLEU is corpus BLEU
against all of the MR's held-out descriptions (multi-reference), ROUGE-L the E2E scripts' (best reference),
SER the slot error rate (ldlm.evaluation.slot_error: omitted or contradicted attribute values), Div the diversity of each
MR's outputs across seeds (LD4LG's Div over 2- to 4-grams, averaged over MRs). The reference row scores each
human description against the MR's other descriptions.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from ldlm.evaluation import metrics
from ldlm.evaluation.slot_error import slot_error_rate


def heldout_mrs(workdir: Path) -> tuple[list[str], list[list[str]]]:
    """The held-out MRs, in file order, and each one's descriptions."""
    by_mr: dict[str, list[str]] = defaultdict(list)
    for line in (workdir / "heldout.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        by_mr[record["mr"]].append(record["text"])
    return list(by_mr), list(by_mr.values())


def score(mrs: list[str], refs: list[list[str]], outputs_by_seed: list[list[str]]) -> dict:
    """BLEU, ROUGE-L and SER averaged over seeds; Div of each MR's outputs across seeds."""
    per_seed = [{"bleu": metrics.multi_reference_bleu(outs, refs), "rouge_l": metrics.rouge_l(outs, refs),
                 "ser": slot_error_rate(mrs, outs)} for outs in outputs_by_seed]
    row = {k: sum(s[k] for s in per_seed) / len(per_seed) for k in per_seed[0]}
    across = [metrics.diversity([outs[i] for outs in outputs_by_seed]) for i in range(len(mrs))]
    row["div_across_seeds"] = sum(across) / len(across)
    row["mean_words"] = sum(metrics.mean_length(outs) for outs in outputs_by_seed) / len(outputs_by_seed)
    row["unknown_words"] = metrics.unknown_word_rate([t for outs in outputs_by_seed for t in outs])
    return row


def reference_row(mrs: list[str], refs: list[list[str]]) -> dict:
    """Each human description against the MR's other ones (MRs with a single description are skipped)."""
    outs, others, sources = [], [], []
    for mr, texts in zip(mrs, refs):
        for i, text in enumerate(texts):
            if len(texts) > 1:
                outs.append(text)
                others.append(texts[:i] + texts[i + 1 :])
                sources.append(mr)
    return {"bleu": metrics.multi_reference_bleu(outs, others), "rouge_l": metrics.rouge_l(outs, others),
            "ser": slot_error_rate(sources, outs), "div_across_seeds": None,
            "mean_words": metrics.mean_length(outs), "unknown_words": metrics.unknown_word_rate(outs)}


def run_model(path: Path, mrs: list[str], refs: list[list[str]], seeds: int, guidance: list[float],
              sampler: str | None, steps: int | None) -> tuple[dict, dict]:
    import ldlm

    pipe = ldlm.load(path)
    rows, outputs = {}, {}
    for w in guidance:
        start = time.perf_counter()
        by_seed = [pipe.generate_from(mrs, guidance=w, seed=seed, sampler=sampler, steps=steps, progress=False)
                   for seed in range(seeds)]
        seconds = (time.perf_counter() - start) / seeds
        rows[f"ldlm w={w:g}"] = {**score(mrs, refs, by_seed), "seconds_per_pass": seconds}
        outputs[f"ldlm w={w:g}"] = by_seed
        print(f"w={w:g}: {rows[f'ldlm w={w:g}']}", flush=True)
    return rows, outputs


def run_baseline(path: Path, mrs: list[str], refs: list[list[str]], seeds: int) -> tuple[dict, dict]:
    from ldlm.training.baseline import generate_from_language_model

    rows, outputs = {}, {}
    for name, kwargs in (("GPT-2 beam 4", {"num_beams": 4}), ("GPT-2 nucleus 0.95", {"top_p": 0.95})):
        start = time.perf_counter()
        runs = 1 if "beam" in name else seeds  # beam search is deterministic: every seed gives the same texts
        by_seed = [generate_from_language_model(path, mrs, seed=seed, **kwargs) for seed in range(runs)]
        seconds = (time.perf_counter() - start) / runs
        rows[name] = {**score(mrs, refs, by_seed * (seeds if runs == 1 else 1)), "seconds_per_pass": seconds}
        outputs[name] = by_seed
        print(f"{name}: {rows[name]}", flush=True)
    return rows, outputs


def table(rows: dict) -> str:
    lines = ["| system | BLEU | ROUGE-L | SER | Div across seeds | words | unknown words | s / pass |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        div = "-" if r["div_across_seeds"] is None else f"{r['div_across_seeds']:.3f}"
        seconds = f"{r['seconds_per_pass']:.1f}" if "seconds_per_pass" in r else "-"
        lines.append(f"| {name} | {r['bleu']:.1f} | {r['rouge_l']:.1f} | {100 * r['ser']:.1f}% | {div} | "
                     f"{r['mean_words']:.1f} | {100 * r['unknown_words']:.2f}% | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="the split's folder (heldout.jsonl)")
    parser.add_argument("--model", type=Path, nargs="*", default=[], help="conditional ldlm checkpoints")
    parser.add_argument("--baseline", type=Path, help="a conditional `ldlm baseline` model")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="guidance weights to sweep")
    parser.add_argument("--seeds", type=int, default=5, help="samples per MR (default 5)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the checkpoint's)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    parser.add_argument("--output", type=Path, help="write rows and outputs as JSON here")
    args = parser.parse_args()
    mrs, refs = heldout_mrs(args.workdir)
    print(f"{len(mrs)} held-out MRs, {sum(map(len, refs))} descriptions", flush=True)
    rows, outputs = {"human (leave one out)": reference_row(mrs, refs)}, {}
    for model in args.model:
        got, outs = run_model(model, mrs, refs, args.seeds, args.guidance, args.sampler, args.steps)
        prefix = f"{model.name}: " if len(args.model) > 1 else ""
        rows.update({prefix + k: v for k, v in got.items()})
        outputs.update({prefix + k: v for k, v in outs.items()})
    if args.baseline:
        got, outs = run_baseline(args.baseline, mrs, refs, args.seeds)
        rows.update(got)
        outputs.update(outs)
    print(table(rows))
    for name, by_seed in outputs.items():  # ten outputs: five MRs, two seeds (or the one beam output)
        print(f"\n{name}:")
        for i in range(min(5, len(mrs))):
            print(f"  MR: {mrs[i]}")
            for outs in by_seed[:2]:
                print(f"    - {outs[i]}")
    if args.output:
        args.output.write_text(json.dumps({"mrs": mrs, "rows": rows, "outputs": outputs}, indent=2,
                                          ensure_ascii=False))


if __name__ == "__main__":
    main()
