"""What the int8 reverse transformer costs in text on E2E, against the fp32 graphs of the same export (issue 20).

    python bench/quality/int8_quality.py --workdir runs/e2e-cond --export cross_onnx [--compare OLD_EXPORT ...] \\
        --seeds 5 --output int8.json

Every held-out MR (bench/quality/e2e_conditional.py's split) is generated from once per seed by the export's fp32 graphs,
with its int8 reverse transformer, its int8 decoder step, and both (and with each --compare export's int8
reverse transformer, an older quantization recipe), with
the checkpoint's sampler, guidance and beam decode. Per variant: MAUVE of all its outputs against the held-out
descriptions (MiniLM sentence features, MAUVE's k-means seeded by each sampling seed in turn, mean and range),
BLEU and slot error rate averaged over seeds, how many outputs are word for word fp32's, and the seconds per
pass (generation of every MR once).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from e2e_conditional import heldout_mrs  # noqa: E402

from ldlm.evaluation import metrics  # noqa: E402
from ldlm.evaluation.slot_error import slot_error_rate  # noqa: E402


def run(pipe, mrs: list[str], seeds: int) -> tuple[list[list[str]], float]:
    start = time.perf_counter()
    by_seed = [pipe.generate_from(mrs, seed=seed, progress=False) for seed in range(seeds)]
    return by_seed, (time.perf_counter() - start) / seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="the split's folder (heldout.jsonl)")
    parser.add_argument("--export", type=Path, required=True, help="an ONNX export with an int8 reverse transformer")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other exports whose int8 to score too")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    import ldlm
    from ldlm.model.encoder import LatentEncoder
    from ldlm.evaluation.evaluate import features
    from ldlm.runtimes.onnx_session import OnnxOptions

    mrs, refs = heldout_mrs(args.workdir)
    flat_refs = [r for rs in refs for r in rs]
    encoder = LatentEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")
    ref_features = features(encoder, flat_refs)
    export = args.workdir / args.export
    variants = {"fp32": ldlm.load(export),
                "int8 reverse": ldlm.load(export, onnx_options=OnnxOptions(int8_reverse=True)),
                "int8 decoder step": ldlm.load(export, onnx_options=OnnxOptions(int8_decoder=True)),
                "int8 both": ldlm.load(export, onnx_options=OnnxOptions(int8_reverse=True, int8_decoder=True))}
    for other in args.compare:
        variants[f"int8 reverse ({other.name})"] = ldlm.load(args.workdir / other,
                                                              onnx_options=OnnxOptions(int8_reverse=True))
    outputs, rows = {}, {}
    for name, pipe in variants.items():
        by_seed, seconds = run(pipe, mrs, args.seeds)
        outputs[name] = by_seed
        pooled = [t for outs in by_seed for t in outs]
        pooled_features = features(encoder, pooled)
        mauve = [metrics.mauve_score(pooled_features, ref_features, seed=seed) for seed in range(args.seeds)]
        same = sum(a == b for outs, fp32 in zip(by_seed, outputs["fp32"]) for a, b in zip(outs, fp32))
        rows[name] = {"mauve": statistics.mean(mauve), "mauve_min": min(mauve), "mauve_max": max(mauve),
                      "bleu": statistics.mean(metrics.multi_reference_bleu(o, refs) for o in by_seed),
                      "ser": statistics.mean(slot_error_rate(mrs, o) for o in by_seed),
                      "identical_to_fp32": same, "outputs": len(pooled), "seconds_per_pass": seconds}
        print(name, rows[name], flush=True)
    print("| variant | MAUVE (range over k-means seeds) | BLEU | SER | identical to fp32 | s / pass |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['mauve']:.3f} ({r['mauve_min']:.3f}-{r['mauve_max']:.3f}) | {r['bleu']:.1f} | "
              f"{100 * r['ser']:.1f}% | {r['identical_to_fp32']} of {r['outputs']} | {r['seconds_per_pass']:.1f} |")
    if args.output:
        args.output.write_text(json.dumps({"mrs": mrs, "rows": rows, "outputs": outputs}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
