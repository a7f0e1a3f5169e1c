"""`ldlm eval` and `ldlm baseline`: scores, and the plain GPT-2 to compare with."""

from __future__ import annotations

import json
from pathlib import Path

from ldlm.cli.flags import add_common_flags, add_training_flags, load_pipeline, read_text_file
from ldlm.model.config import PRESETS, SAMPLER_NAMES, size_overrides


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="score reconstruction and samples against references (MAUVE, Div, Mem, BLEU)")
    p.add_argument("checkpoint", nargs="?", help="checkpoint directory (omit to score --samples alone)")
    p.add_argument("--references", required=True, help="reference texts (held out from training), txt or jsonl")
    p.add_argument("--train", required=True, nargs="+", help="the training texts, for memorization (Mem)")
    p.add_argument("--samples", help="also score the texts of this file (e.g. a baseline's samples)")
    p.add_argument("--num-samples", type=int, default=500, help="samples on each side of MAUVE (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling and the reference split (default 0)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help="sampler (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=None, help="steps of ddim or dpm++2m (default 50 and 20)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl files (default text)")
    p.add_argument("--output", help="write the full result (with example samples) as JSON to this file")
    p.add_argument("--decoding", choices=["beam", "nucleus"], default=None,
                   help="how samples are decoded (default: the checkpoint's; beam for preset small)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus threshold (default: the checkpoint's, 0.95)")
    p.add_argument("--no-reconstruction", action="store_true",
                   help="score the checkpoint's samples only (reconstruction does not depend on sampling settings)")
    add_common_flags(p)
    p = sub.add_parser("baseline", help="a plain GPT-2 language model of the decoder's size: train or sample")
    base = p.add_subparsers(dest="baseline_command", required=True, metavar="ACTION", help="train or sample")
    q = base.add_parser("train", help="train on the same texts with a time budget")
    q.add_argument("--data", nargs="+", required=True, metavar="FILE", help="plain text or .jsonl training files")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--preset", choices=sorted(PRESETS), default="small", help="decoder sizes to match (default small)")
    q.add_argument("--text-field", default="text", help="field holding the text in .jsonl files (default text)")
    q.add_argument("--source-field", metavar="FIELD",
                   help="a conditional language model of `source <|sep|> text`: this .jsonl field holds the source")
    q.add_argument("--time-budget", type=float, default=600.0, help="training seconds (default 600; 0: no time limit)")
    q.add_argument("--steps", type=int, default=None,
                   help="step limit (default none); with --time-budget 0, a run that does not depend on the machine")
    q.add_argument("--max-text-tokens", type=int, default=None,
                   help="tokens kept per text (default: the preset's); the context grows to fit")
    q.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    add_training_flags(q)
    q.add_argument("--no-progress", action="store_true", help="turn progress bars off")
    q = base.add_parser("sample", help="nucleus samples (p=0.95), one per line; from sources, beam search")
    q.add_argument("model", help="directory written by `ldlm baseline train`")
    q.add_argument("--source-file", metavar="FILE",
                   help="a conditional model: one text per source line of FILE (beam search; nucleus with --top-p)")
    q.add_argument("--num-beams", type=int, default=4, help="with --source-file: beams (default 4)")
    q.add_argument("-n", "--num-samples", type=int, default=8, help="how many samples (default 8)")
    q.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    q.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling threshold (default 0.95; with --source-file, beam search unless given)")
    q.add_argument("--max-new-tokens", type=int, default=64,
                   help="length bound of each sample (default 64; match the training's --max-text-tokens)")
    q.add_argument("--output", help="write the samples to this file instead of printing them")


def cmd_eval(args) -> None:
    from ldlm.evaluation.evaluate import EvalSettings, evaluate, format_table
    from ldlm.training.data import read_corpus, read_texts

    if args.checkpoint is None and args.samples is None:
        raise ValueError("give a checkpoint, --samples FILE, or both")
    settings = EvalSettings(num_samples=args.num_samples, seed=args.seed, sampler=args.sampler, steps=args.steps,
                            num_beams=args.num_beams, decoding=args.decoding, top_p=args.top_p,
                            reconstruction=not args.no_reconstruction)
    result = evaluate(read_texts(args.references, args.text_field), read_corpus(args.train, args.text_field),
                      pipe=load_pipeline(args) if args.checkpoint else None,
                      samples=read_texts(args.samples, args.text_field) if args.samples else None,
                      settings=settings, progress=not args.no_progress)
    print(format_table(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, ensure_ascii=False))


def cmd_baseline(args) -> None:
    from ldlm.model.config import ModelConfig
    from ldlm.training.baseline import generate_from_language_model, sample_language_model, train_language_model
    from ldlm.training.data import read_conditional_corpus, read_corpus

    if args.baseline_command == "train":
        sources = None
        if args.source_field:
            texts, sources = read_conditional_corpus(args.data, args.text_field, args.source_field)
        else:
            texts = read_corpus(args.data, args.text_field)
        config = ModelConfig.from_preset(args.preset, **size_overrides(args.preset, args.max_text_tokens))
        if not args.time_budget and not args.steps:
            raise SystemExit("ldlm baseline train: give --steps N or a --time-budget above 0")
        summary = train_language_model(texts, args.out, config, time_budget=args.time_budget, max_steps=args.steps,
                                       seed=args.seed, device=args.device, precision=args.precision,
                                       progress=not args.no_progress, sources=sources)
        print(json.dumps(summary, indent=2))
        return
    if args.source_file:
        sources = [line.strip() for line in read_text_file(args.source_file, "--source-file").splitlines()
                   if line.strip()]
        texts = generate_from_language_model(args.model, sources, num_beams=args.num_beams, top_p=args.top_p,
                                             seed=args.seed, max_new_tokens=args.max_new_tokens)
    else:
        texts = sample_language_model(args.model, args.num_samples, seed=args.seed,
                                      top_p=0.95 if args.top_p is None else args.top_p,
                                      max_new_tokens=args.max_new_tokens)
    if args.output:
        Path(args.output).write_text("\n".join(texts) + "\n", encoding="utf-8")
    else:
        print("\n".join(texts))


# the command each parser of this group runs
COMMANDS = {"eval": cmd_eval, "baseline": cmd_baseline}
