"""Conditional generation on E2E: meaning representation (MR) -> description, scored as the E2E challenge scores
it, against the same-size GPT-2 trained as a conditional language model (issue 18).

    python bench/quality/e2e_quality.py split --data ../shared/data/e2e/train.jsonl --workdir runs/e2e-cond
    cd runs/e2e-cond
    ldlm train --data train.jsonl --source-field mr --out cross --preset small --time-budget 0 \\
        --decoder-steps 1800 --diffusion-steps 3600   # with --ema-decay 0.999 and more steps: RESULTS, 2026-12-08
    ldlm baseline train --data train.jsonl --source-field mr --out lm --preset small --time-budget 0 --steps 1800
    python bench/quality/e2e_conditional.py --workdir . --model cross --baseline lm --guidance 0 1 2 3 5 --seeds 5

Every held-out MR (whole MRs: none was seen in training) is generated from once per seed. BLEU is corpus BLEU
against all of the MR's held-out descriptions (multi-reference), ROUGE-L the E2E scripts' (best reference),
SER the slot error rate by two matchers (ldlm.evaluation.slot_error: omitted or contradicted attribute values;
ldlm.evaluation.ser_cleaning: the E2E cleaning project's stricter rules, added slots counted too), Div the
diversity of each MR's outputs across seeds (LD4LG's Div over 2- to 4-grams, averaged over MRs). The reference
row scores each human description against the MR's other descriptions. `--candidates 1 4 8 --rerank mbr slots`
adds rows that keep one of k candidates per MR (Pipeline.generate_from's reranking); `--temperature 1 0.4`
rows per starting-noise temperature; `--reconstruction` a row per model scoring the human descriptions encoded
and decoded by it, as the reference row is scored.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import defaultdict
from pathlib import Path

from ldlm.evaluation import metrics
from ldlm.evaluation.ser_cleaning import cleaning_slot_error_rate
from ldlm.evaluation.slot_error import slot_error_rate


def heldout_mrs(workdir: Path) -> tuple[list[str], list[list[str]]]:
    """The held-out MRs, in file order, and each one's descriptions."""
    by_mr: dict[str, list[str]] = defaultdict(list)
    for line in (workdir / "heldout.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        by_mr[record["mr"]].append(record["text"])
    return list(by_mr), list(by_mr.values())


FOLDS = 4  # the held-out MRs in this many parts, for the spread that the choice of MRs gives


def _scores(mrs: list[str], refs: list[list[str]], outs: list[str]) -> dict:
    return {"bleu": metrics.multi_reference_bleu(outs, refs), "rouge_l": metrics.rouge_l(outs, refs),
            "ser": slot_error_rate(mrs, outs), "ser_cleaning": cleaning_slot_error_rate(mrs, outs)}


def score(mrs: list[str], refs: list[list[str]], outputs_by_seed: list[list[str]]) -> dict:
    """BLEU, ROUGE-L and SER by both matchers averaged over seeds, with their range over seeds and over FOLDS
    parts of the MRs; Div of each MR's outputs across seeds."""
    per_seed = [_scores(mrs, refs, outs) for outs in outputs_by_seed]
    row = {k: sum(s[k] for s in per_seed) / len(per_seed) for k in per_seed[0]}
    folds = [list(range(f, len(mrs), FOLDS)) for f in range(FOLDS)]
    per_fold = [[_scores([mrs[i] for i in fold], [refs[i] for i in fold], [outs[i] for i in fold])
                 for outs in outputs_by_seed] for fold in folds if fold]
    for k in ("bleu", "ser", "ser_cleaning"):
        row[f"{k}_seed_range"] = [min(s[k] for s in per_seed), max(s[k] for s in per_seed)]
        fold_means = [sum(s[k] for s in fold) / len(fold) for fold in per_fold]
        row[f"{k}_fold_range"] = [min(fold_means), max(fold_means)]
    across = [metrics.diversity([outs[i] for outs in outputs_by_seed]) for i in range(len(mrs))]
    row["div_across_seeds"] = sum(across) / len(across)
    row["mean_words"] = sum(metrics.mean_length(outs) for outs in outputs_by_seed) / len(outputs_by_seed)
    row["unknown_words"] = metrics.unknown_word_rate([t for outs in outputs_by_seed for t in outs])
    return row


def leave_one_out(mrs: list[str], refs: list[list[str]]) -> tuple[list[str], list[list[str]], list[str]]:
    """Each human description, the MR's other ones, and its MR (MRs with a single description are skipped)."""
    outs, others, sources = [], [], []
    for mr, texts in zip(mrs, refs):
        for i, text in enumerate(texts):
            if len(texts) > 1:
                outs.append(text)
                others.append(texts[:i] + texts[i + 1 :])
                sources.append(mr)
    return outs, others, sources


def reference_row(mrs: list[str], refs: list[list[str]], reconstructed_by: Path | None = None) -> dict:
    """Each human description against the MR's other ones; reconstructed_by: each description encoded and decoded
    by this checkpoint instead (beam), the decoder's ceiling in the same terms."""
    outs, others, sources = leave_one_out(mrs, refs)
    if reconstructed_by is not None:
        import ldlm

        outs = ldlm.load(reconstructed_by).reconstruct(outs, progress=False)
    return {**_scores(sources, others, outs), "div_across_seeds": None, "mean_words": metrics.mean_length(outs),
            "unknown_words": metrics.unknown_word_rate(outs)}


def run_model(path: Path, mrs: list[str], refs: list[list[str]], *, seeds: int, guidance: list[float],
              temperatures: list[float], sampler: str | None, steps: int | None, candidates: list[int],
              rerankers: list[str]) -> tuple[dict, dict]:
    """Every guidance weight and temperature, at each candidate count (k > 1: with each reranker). Item i of seed
    s draws from seed s * len(mrs) + i. The K = max(candidates) candidates of each MR are drawn once, in one call,
    and every smaller k reranks the first k of them: what generate_from(..., candidates=k) draws and keeps
    (candidate j's seed does not depend on k; tests/test_rerank.py). A row's seconds: the K-candidate pass scaled
    by k / K."""
    import ldlm
    from ldlm.evaluation.rerank import candidate_seeds, choose

    pipe = ldlm.load(path)
    K = max(candidates)
    rows, outputs = {}, {}
    for w, temperature in itertools.product(guidance, temperatures):
        drawn, seconds = [], 0.0  # drawn[seed][mr]: the K candidates
        for seed in range(seeds):
            start = time.perf_counter()
            item_seeds = candidate_seeds(len(mrs), K, 0, [seed * len(mrs) + i for i in range(len(mrs))])
            texts = pipe.generate_from([mr for mr in mrs for _ in range(K)], guidance=w, seeds=item_seeds,
                                       temperature=temperature, sampler=sampler, steps=steps, progress=False)
            seconds += (time.perf_counter() - start) / seeds
            drawn.append([texts[i * K : (i + 1) * K] for i in range(len(mrs))])
        for k in candidates:
            for rerank in rerankers if k > 1 else ["mbr"]:
                name = (f"ldlm w={w:g}" + ("" if temperature == 1 else f", temperature {temperature:g}")
                        + ("" if k == 1 else f", {rerank} of {k}"))
                by_seed = [[group[choose(group[:k], rerank, mr)] for group, mr in zip(per_mr, mrs)]
                           for per_mr in drawn]
                rows[name] = {**score(mrs, refs, by_seed), "seconds_per_pass": seconds * k / K}
                outputs[name] = by_seed
                print(f"{name}: {rows[name]}", flush=True)
    return rows, outputs


def run_baseline(path: Path, mrs: list[str], refs: list[list[str]], seeds: int, candidates: list[int],
                 rerankers: list[str]) -> tuple[dict, dict]:
    """Beam search (4 beams, one text per MR), and nucleus sampling at each candidate count (k > 1: k samples per
    MR, one kept by each reranker, as ldlm's rows)."""
    from ldlm.training.baseline import generate_from_language_model

    rows, outputs = {}, {}
    runs = [("GPT-2 beam 4", {"num_beams": 4})] + [
        ("GPT-2 nucleus 0.95" + ("" if k == 1 else f", {rerank} of {k}"),
         {"top_p": 0.95, "candidates": k, "rerank": rerank})
        for k in candidates for rerank in (rerankers if k > 1 else ["mbr"])]
    for name, kwargs in runs:
        start = time.perf_counter()
        count = 1 if "beam" in name else seeds  # beam search is deterministic: every seed gives the same texts
        by_seed = [generate_from_language_model(path, mrs, seed=seed, **kwargs) for seed in range(count)]
        seconds = (time.perf_counter() - start) / count
        rows[name] = {**score(mrs, refs, by_seed * (seeds if count == 1 else 1)), "seconds_per_pass": seconds}
        outputs[name] = by_seed
        print(f"{name}: {rows[name]}", flush=True)
    return rows, outputs


def table(rows: dict) -> str:
    lines = ["| system | BLEU (seeds; MR quarters) | ROUGE-L | SER ldlm | SER cleaning rules (seeds; MR quarters) | "
             "Div across seeds | words | unknown words | s / pass |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def spread(r: dict, k: str, scale: float, unit: str = "") -> str:
        if f"{k}_seed_range" not in r:
            return f"{scale * r[k]:.1f}{unit}"
        (a, b), (c, d) = r[f"{k}_seed_range"], r[f"{k}_fold_range"]
        return f"{scale * r[k]:.1f}{unit} ({scale * a:.1f}-{scale * b:.1f}; {scale * c:.1f}-{scale * d:.1f})"

    for name, r in rows.items():
        div = "-" if r["div_across_seeds"] is None else f"{r['div_across_seeds']:.3f}"
        seconds = f"{r['seconds_per_pass']:.1f}" if "seconds_per_pass" in r else "-"
        lines.append(f"| {name} | {spread(r, 'bleu', 1)} | {r['rouge_l']:.1f} | {100 * r['ser']:.1f}% | "
                     f"{spread(r, 'ser_cleaning', 100, '%')} | {div} | {r['mean_words']:.1f} | "
                     f"{100 * r['unknown_words']:.2f}% | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="the split's folder (heldout.jsonl)")
    parser.add_argument("--model", type=Path, nargs="*", default=[], help="conditional ldlm checkpoints")
    parser.add_argument("--baseline", type=Path, help="a conditional `ldlm baseline` model")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="guidance weights to sweep")
    parser.add_argument("--temperature", type=float, nargs="+", default=[1.0],
                        help="starting-noise temperatures to sweep (default 1)")
    parser.add_argument("--seeds", type=int, default=5, help="samples per MR (default 5)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the checkpoint's)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    parser.add_argument("--candidates", type=int, nargs="+", default=[1],
                        help="candidates per MR to sweep (default 1: no reranking)")
    parser.add_argument("--rerank", nargs="+", default=["mbr"], choices=["mbr", "slots"],
                        help="rerankers for the candidate counts above 1 (default mbr)")
    parser.add_argument("--reconstruction", action="store_true",
                        help="add a row per model: the human descriptions encoded and decoded, scored as the human row")
    parser.add_argument("--output", type=Path, help="write rows and outputs as JSON here")
    args = parser.parse_args()
    mrs, refs = heldout_mrs(args.workdir)
    print(f"{len(mrs)} held-out MRs, {sum(map(len, refs))} descriptions", flush=True)
    rows, outputs = {"human (leave one out)": reference_row(mrs, refs)}, {}
    for model in args.model:
        if args.reconstruction:
            rows[f"{model.name} reconstructing the human"] = reference_row(mrs, refs, reconstructed_by=model)
        got, outs = run_model(model, mrs, refs, seeds=args.seeds, guidance=args.guidance,
                              temperatures=args.temperature, sampler=args.sampler, steps=args.steps,
                              candidates=args.candidates, rerankers=args.rerank)
        prefix = f"{model.name}: " if len(args.model) > 1 else ""
        rows.update({prefix + k: v for k, v in got.items()})
        outputs.update({prefix + k: v for k, v in outs.items()})
    if args.baseline:
        got, outs = run_baseline(args.baseline, mrs, refs, args.seeds, args.candidates, args.rerank)
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
