"""`ldlm generate`, `reconstruct`, `vary`: text from a model, and batch jobs (locally or on Ray)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ldlm.cli.flags import (add_common_flags, add_sampling_flags, load_pipeline, onnx_options, print_results,
                            read_text_file, texts_from_args)

MAX_CLI_SAMPLES = 1_000_000  # one command's -n (times its sources); a job's resume keeps a key per record
MAX_JOB_BATCH = 4096  # a batch job's --batch-size


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="unconditional samples, or a batch job over a JSONL file (--input/--output)")
    p.add_argument("checkpoint", help="checkpoint directory (or an export directory, for backend onnx)")
    p.add_argument("-n", "--num-samples", type=int, default=None,
                   help="how many samples without --input (default 8), or per --source / --label (default 1)")
    p.add_argument("--source", action="append", metavar="TEXT",
                   help="a text-conditional model: generate from this source text (repeat for more)")
    p.add_argument("--source-file", metavar="FILE", help="a text-conditional model: one source text per line")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="a class-conditional model: generate for this label (repeat for more)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance weight: 0 unconditional, 1 conditional, above 1 guided "
                        "(default: the checkpoint's)")
    p.add_argument("--candidates", type=int, default=1, metavar="K",
                   help="with --source/--label, or a batch job's conditional lines: sample K texts per item in the "
                        "same loop and keep one (default 1; at most 64)")
    p.add_argument("--rerank", choices=["mbr", "slots"], default="mbr",
                   help="which candidate is kept: mbr, the one agreeing most with the others (default); slots, "
                        "for E2E meaning representations, the fewest slot errors against the source")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="scale of the starting noise, 0 to 2 (default 1, as trained): below 1, less varied but more "
                        "typical texts (with DPM-Solver++ or DDIM the noise's only draw)")
    p.add_argument("--input", help="batch job: JSONL, one {\"id\", [\"text\", \"mode\", \"strength\"] or "
                                   "[\"source\"] or [\"label\"], [\"seed\"], [\"guidance\"]} per line")
    p.add_argument("--output", help="batch job: JSONL written in input order, flushed batch by batch")
    p.add_argument("--resume", action="store_true", help="batch job: skip the ids --output already holds (same settings)")
    p.add_argument("--batch-size", type=int, default=64, help="batch job: items per batch (default 64; halved on OOM)")
    p.add_argument("--ray", action="store_true",
                   help="run as a batch job on Ray, one pipeline actor per GPU or CPU worker (without --output: "
                        "the records printed in order)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--ray-workers", type=int, default=None, help="pipeline actors (default: GPUs, else CPUs / 2)")
    p.add_argument("--decoding", choices=["beam", "nucleus"], default=None,
                   help="how samples are decoded (default: the checkpoint's; beam for preset small; jobs: beam)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus threshold (default: the checkpoint's, 0.95)")
    add_sampling_flags(p)
    add_common_flags(p)
    for name, text in (("reconstruct", "encode texts and decode them back"),
                       ("vary", "encode texts, noise them to strength*T, denoise and decode")):
        p = sub.add_parser(name, help=text)
        p.add_argument("checkpoint", help="checkpoint directory")
        p.add_argument("texts", nargs="*", help="input texts")
        p.add_argument("--file", help="a file with one input text per line")
        if name == "vary":
            p.add_argument("--strength", type=float, default=0.3, help="fraction of T to noise to, in [0, 1] (default 0.3)")
            add_sampling_flags(p)
        add_common_flags(p)


def _conditions_from_args(args) -> tuple[str, list[str]] | None:
    """("sources" or "labels", the list) from --source / --source-file / --label, or None."""
    sources = list(args.source or [])
    if args.source_file:
        sources += [line.strip() for line in read_text_file(args.source_file, "--source-file").splitlines()
                    if line.strip()]
    if sources and args.label:
        raise ValueError("give --source/--source-file or --label, not both")
    if args.source_file and not sources:
        raise ValueError(f"--source-file {args.source_file} holds no source text")
    if sources:
        return "sources", sources
    return ("labels", list(args.label)) if args.label else None


def _sample_count(args) -> int:
    """-n without conditions: how many unconditional samples (default 8)."""
    return 8 if args.num_samples is None else args.num_samples


def _each_condition(args, given: list[str]) -> list[str]:
    """Each source or label repeated -n times (default once): one entry per text to generate."""
    if len(given) * (args.num_samples or 1) > MAX_CLI_SAMPLES:
        raise ValueError(f"{len(given)} conditions times -n {args.num_samples or 1} is over {MAX_CLI_SAMPLES:,} "
                         "texts, the most one command generates: split the sources over several runs")
    return [c for c in given for _ in range(1 if args.num_samples is None else args.num_samples)]


def _check_sample_count(args) -> None:
    n = args.num_samples
    if n is not None and not 1 <= n <= MAX_CLI_SAMPLES:
        raise ValueError(f"-n must be from 1 to {MAX_CLI_SAMPLES:,}, got {n}: for more, run several jobs (--output "
                         "FILE with --seed S each)")


def cmd_generate(args) -> None:
    _check_sample_count(args)
    conditions = _conditions_from_args(args)
    if args.input or args.output:
        if conditions:
            raise ValueError("a batch job reads its sources or labels from --input lines ({\"id\": ..., \"source\": "
                             "...}): drop --source/--label")
        return _run_generate_job(args, args.input, args.output)
    if args.candidates != 1 and not (conditions or args.input):
        raise ValueError("--candidates reranks the texts of each source or label: give --source/--source-file/"
                         "--label, or a batch job's --input with conditional lines")
    if args.ray:
        return _print_ray_job(args, conditions)
    pipe = load_pipeline(args)
    _check_conditions_fit(args, pipe.config, conditions)
    sampler, steps = pipe.sampling(args.sampler, args.steps)
    common = dict(steps=args.steps, sampler=args.sampler, seed=args.seed, eta=args.eta, num_beams=args.num_beams,
                  decoding=args.decoding, top_p=args.top_p, temperature=args.temperature,
                  progress=not args.no_progress)
    if conditions is None:  # printed a batch at a time, as each ends: memory stays flat for any -n
        printed = 0
        for texts in pipe.generate_batches(_sample_count(args), **common):
            print_results(args, [None] * len(texts), texts, first_index=printed, sampler=sampler, steps=steps,
                           seed=args.seed)
            sys.stdout.flush()
            printed += len(texts)
        return
    kind, given = conditions
    each = _each_condition(args, given)
    guidance = pipe.config.guidance if args.guidance is None else args.guidance
    i = 0
    if args.candidates == 1:
        batches = pipe.generate_batches(len(each), **common, **{kind: each}, guidance=args.guidance)
    else:  # each item's candidates drawn from seed + its index (ldlm.evaluation.rerank.candidate_seeds)
        batches = [pipe.generate_from(**common, **{kind: each}, guidance=args.guidance, candidates=args.candidates,
                                      rerank=args.rerank)]
    for texts in batches:
        for text in texts:  # printed as each batch ends
            if args.json:
                record = {"index": i, kind[:-1]: each[i], "text": text, "guidance": guidance, "sampler": sampler,
                          "steps": steps, "seed": args.seed}
                print(json.dumps(record, ensure_ascii=False))
            else:
                print(text)
            i += 1
        sys.stdout.flush()


def _check_conditions_fit(args, config, conditions: tuple[str, list[str]] | None) -> None:
    """--source / --label / --guidance against what the model is conditioned on, in the command line's words."""
    flags = {"text": "--source TEXT or --source-file FILE", "label": f"--label NAME (one of {config.labels})"}
    if config.condition is None:
        if conditions is not None or args.guidance is not None:
            given = "--guidance" if conditions is None else "--source/--label"
            raise ValueError(f"this model is unconditional: it reads no source or label, so {given} would be "
                             "ignored; drop it, or load a conditional model (ldlm train --source-field/--label-field)")
        return
    if conditions is None:
        if args.guidance is not None:
            raise ValueError(f"--guidance weighs a condition: pass {flags[config.condition]} with it")
        return
    kind = "text" if conditions[0] == "sources" else "label"
    if kind != config.condition:
        raise ValueError(f"this model is conditioned on a {'source text' if config.condition == 'text' else 'label'}: "
                         f"pass {flags[config.condition]}, not {'--source' if kind == 'text' else '--label'}")


def _print_ray_job(args, conditions: tuple[str, list[str]] | None) -> None:
    """`--ray` without --output: the request as a batch job on Ray (each item seeded from --seed and its id, as
    in any batch job), its records printed in input order."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        job_input, job_output = None, Path(tmp) / "output.jsonl"  # unconditional: ids 0..N-1, as a job's -n N
        if conditions is not None:
            kind, given = conditions
            field = "source" if kind == "sources" else "label"
            job_input = Path(tmp) / "input.jsonl"
            job_input.write_text("".join(json.dumps({"id": i, field: c}, ensure_ascii=False) + "\n"
                                         for i, c in enumerate(_each_condition(args, given))), encoding="utf-8")
        _run_generate_job(args, job_input, job_output, report=False)
        records = [json.loads(line) for line in job_output.read_text(encoding="utf-8").splitlines()]
    for record in sorted(records, key=lambda r: r["id"]):
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
        elif "error" in record:
            print(f"ldlm generate: item {record['id']}: error: {record['error']}", file=sys.stderr)
        else:
            print(record["text"])


def _run_generate_job(args, input_path, output_path, report: bool = True) -> None:
    import logging

    from ldlm.jobs.batch import run_job
    from ldlm.jobs.items import read_input_file, unconditional_items
    from ldlm.jobs.settings import JobSettings, model_fingerprint

    if not output_path:
        raise ValueError("--input needs --output FILE (the job's JSONL results)")
    if args.top_p is not None or args.decoding == "nucleus":
        raise ValueError("batch jobs decode by beam search: drop --decoding nucleus / --top-p")
    if not 1 <= args.batch_size <= MAX_JOB_BATCH:
        raise ValueError(f"--batch-size must be from 1 to {MAX_JOB_BATCH}, got {args.batch_size} (a batch is held "
                         "in memory and lost whole to a kill)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = JobSettings(model=model_fingerprint(args.checkpoint), sampler=args.sampler, steps=args.steps,
                           eta=args.eta, num_beams=args.num_beams, dtype=args.dtype, seed=args.seed,
                           guidance=args.guidance, candidates=args.candidates, rerank=args.rerank,
                           temperature=args.temperature)
    if input_path:
        items = read_input_file(input_path, args.seed, output=output_path)
    else:
        items = unconditional_items(_sample_count(args), args.seed)
    if args.ray:
        from ldlm.jobs.ray_jobs import run_job_on_ray

        load_kwargs = {"backend": args.backend, "dtype": args.dtype, "onnx_options": onnx_options(args),
                       "trust_native_code": args.trust_native_code}
        counts = run_job_on_ray(args.checkpoint, list(items), output_path, settings, load_kwargs=load_kwargs,
                                batch_size=args.batch_size, resume=args.resume, workers=args.ray_workers,
                                address=args.ray_address, progress=not args.no_progress)
    else:
        total = None if input_path else _sample_count(args)
        counts = run_job(load_pipeline(args), items, output_path, settings, batch_size=args.batch_size, resume=args.resume,
                         progress=not args.no_progress, total=total)
    if report:
        print(f"{output_path}: {counts['written']} written, {counts['errors']} bad lines reported, "
              f"{counts['skipped']} already done", file=sys.stderr)


def cmd_reconstruct(args) -> None:
    texts = texts_from_args(args)
    outputs = load_pipeline(args).reconstruct(texts, num_beams=args.num_beams, progress=not args.no_progress)
    print_results(args, texts, outputs)


def cmd_vary(args) -> None:
    texts = texts_from_args(args)
    pipe = load_pipeline(args)
    outputs = pipe.vary(texts, args.strength, steps=args.steps, sampler=args.sampler, seed=args.seed, eta=args.eta,
                        num_beams=args.num_beams, progress=not args.no_progress)
    sampler, _ = pipe.sampling(args.sampler, args.steps)
    print_results(args, texts, outputs, strength=args.strength, sampler=sampler, seed=args.seed)


# the command each parser of this group runs
COMMANDS = {"generate": cmd_generate, "reconstruct": cmd_reconstruct, "vary": cmd_vary}
