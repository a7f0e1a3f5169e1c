"""The `ldlm` command line: train, generate, reconstruct, vary, eval, baseline, export, info, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ldlm.runtimes.backends import BACKENDS, BackendUnavailable
from ldlm.model.config import PRESETS, SAMPLER_NAMES, TRAINING_PRECISIONS, size_overrides


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                   help="reverse-diffusion sampler (default: the checkpoint's, dpm++2m 20 for preset small; "
                        "ddpm always runs every timestep)")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps of ddim or dpm++2m (default: the checkpoint's, or 50 and 20)")
    p.add_argument("--eta", type=float, default=0.0, help="ddim noise scale: 0 deterministic, 1 ancestral (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise generator (default 0)")


def _add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-beams", type=int, default=4, help="beams in the decoder's beam search (default 4)")
    p.add_argument("--device", default="cpu", help="torch device to run on, e.g. cpu or cuda (default cpu)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="implementation: auto picks an export directory's own (onnx or aoti), cuda-graph on CUDA "
                        "with triton, else reference")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="engine compute dtype (default float32, the parity mode; the reference is float32 only; "
                        "onnx runs float32 or float16 graphs)")
    p.add_argument("--onnx-provider", choices=["auto", "cpu", "cuda"], default="auto",
                   help="onnx backend: ONNX Runtime provider (default auto: CUDA if installed and --device cuda)")
    p.add_argument("--onnx-threads", type=int, default=0, help="onnx backend: intra-op threads (default 0: all cores)")
    p.add_argument("--onnx-opt-level", choices=["disable", "basic", "extended", "all"], default="all",
                   help="onnx backend: graph optimization level (default all)")
    p.add_argument("--int8", action="store_true",
                   help="onnx backend: run the int8 graphs (reverse transformer and decoder step; about 2x faster on "
                        "the CPU, E2E quality unchanged, most texts as fp32's)")
    p.add_argument("--onnx-cuda-graph", action="store_true",
                   help="onnx backend on CUDA: replay the reverse graph as ONNX Runtime CUDA graphs in the sampling loop")
    _add_trust_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of plain text")
    p.add_argument("--no-progress", action="store_true", help="turn progress bars off")


def _add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-native-code", action="store_true",
                   help="load an AOTInductor export that someone else wrote: its packages are native code that "
                        "runs when loaded (without the flag, only your own exports from this machine load)")


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="torch device to train on, e.g. cuda (default cpu); the data drawn does not depend on it")
    p.add_argument("--precision", choices=TRAINING_PRECISIONS, default="fp32",
                   help="fp32, or bf16 autocast for the matmuls (weights, optimizer and losses stay fp32; "
                        "default fp32)")


def _read_text_file(path: str, flag: str) -> str:
    """A UTF-8 text file named by a flag, with errors that name it."""
    from ldlm.inputs import read_user_file

    try:
        return read_user_file(path, flag, "a text file").decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path} is not UTF-8 text ({e.reason} at byte {e.start}): re-encode it as "
                         "UTF-8") from None


def _texts_from_args(args) -> list[str]:
    texts = list(args.texts)
    if args.file:
        texts += [line.strip() for line in _read_text_file(args.file, "--file").splitlines() if line.strip()]
    if not texts:
        raise SystemExit("give texts as arguments or --file FILE (one text per line)")
    return texts


def _print_results(args, inputs: list[str | None], outputs: list[str], first_index: int = 0, **settings) -> None:
    for i, (source, text) in enumerate(zip(inputs, outputs), start=first_index):
        if args.json:
            record = {"index": i, "text": text, **({"input": source} if source is not None else {}), **settings}
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldlm", description="Latent diffusion language models: train, sample, decode.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on text (decoder, then reverse transformer)")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="plain text (one example a line) or .jsonl files with a text field")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model preset (default small)")
    p.add_argument("--encoder", default=None,
                   help="BERT-family encoder, a local path or hub id (default: the preset's); latent_dim follows it")
    p.add_argument("--decoder", default=None,
                   help="pretrained GPT-2 to fine-tune, a local path or hub id, with its tokenizer "
                        "(default: a GPT-2 built from the preset with a BPE trained on --data)")
    p.add_argument("--self-condition", action="store_true",
                   help="self-condition the reverse transformer on its previous x0 estimate (Chen et al. 2022)")
    p.add_argument("--latent-tokens", type=int, default=None, metavar="K",
                   help="K latent vectors per text from a learned resampler over the encoder's token states "
                        "(default: the preset's, 4 for small; 1 is the design's mean of the states); the "
                        "decoder's prefix grows to fit")
    p.add_argument("--max-text-tokens", type=int, default=None,
                   help="decoder tokens kept per text (default: the preset's; longer texts are cut); "
                        "the decoder's context grows to fit")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl files (default text)")
    condition = p.add_mutually_exclusive_group()
    condition.add_argument("--source-field", metavar="FIELD",
                           help="a text-conditional model: this .jsonl field holds the source each text is generated "
                                "from (E2E: mr); sampled with `ldlm generate --source`")
    condition.add_argument("--label-field", metavar="FIELD",
                           help="a class-conditional model: this .jsonl field holds each text's label; sampled with "
                                "`ldlm generate --label`")
    p.add_argument("--condition-attention", choices=["cross", "joint"], default=None,
                   help="how the reverse transformer reads the condition: cross-attention in each block, or its "
                        "tokens joined to the latent tokens' self-attention (default cross)")
    p.add_argument("--condition-dropout", type=float, default=0.1,
                   help="share of stage-2 rows trained on the null condition, for classifier-free guidance "
                        "(default 0.1)")
    p.add_argument("--guidance", type=float, default=None,
                   help="the checkpoint's default guidance weight w: 0 unconditional, 1 conditional, above 1 "
                        "guided (default 2, measured on E2E)")
    p.add_argument("--time-budget", type=float, default=600.0,
                   help="seconds for both stages together (default 600; 0 means only step limits)")
    p.add_argument("--decoder-share", type=float, default=0.5, help="share of the time budget for stage 1 (default 0.5)")
    p.add_argument("--decoder-steps", type=int, default=None, help="step limit of stage 1 (decoder)")
    p.add_argument("--diffusion-steps", type=int, default=None, help="step limit of stage 2 (reverse transformer)")
    p.add_argument("--decoder-batch-size", type=int, default=64, help="stage 1 batch size (default 64)")
    p.add_argument("--diffusion-batch-size", type=int, default=None,
                   help="stage 2 batch size (default: 256 latent vectors a step: 256 texts, or 256 / K with "
                        "K latent tokens)")
    p.add_argument("--decoder-noise", type=float, default=0.0,
                   help="train the decoder on latents noised with this many per-dimension stds (default 0: clean)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="keep an EMA of the reverse transformer with this decay, e.g. 0.999, and serve it (default off)")
    p.add_argument("--decoder-from", metavar="CHECKPOINT", default=None,
                   help="reuse this checkpoint's trained decoder, tokenizer and encoder; skips stage 1")
    p.add_argument("--reverse-from", metavar="CHECKPOINT", default=None,
                   help="reuse this checkpoint's reverse transformer, latent statistics and encoder; skips stage 2")
    p.add_argument("--eval-every", type=int, default=200, help="steps between held-out evaluations (default 200)")
    p.add_argument("--save-every", type=float, default=300.0, help="seconds between checkpoints (default 300)")
    defaults = "the checkpoint's default for generate, stored in its config (default: the preset's)"
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, help=f"sampler: {defaults}")
    p.add_argument("--sampling-steps", type=int, default=None, help=f"steps of ddim or dpm++2m: {defaults}")
    p.add_argument("--decoding", choices=["beam", "nucleus"], default=None,
                   help=f"beam search or nucleus sampling: {defaults}; nucleus suits a decoder far from converged")
    p.add_argument("--top-p", type=float, default=None, help=f"nucleus threshold: {defaults}")
    p.add_argument("--seed", type=int, default=0, help="seed for init, batches and noise (default 0)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    _add_training_flags(p)
    p.add_argument("--no-progress", action="store_true", help="turn progress bars off")

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
    _add_sampling_flags(p)
    _add_common_flags(p)

    for name, text in (("reconstruct", "encode texts and decode them back"),
                       ("vary", "encode texts, noise them to strength*T, denoise and decode")):
        p = sub.add_parser(name, help=text)
        p.add_argument("checkpoint", help="checkpoint directory")
        p.add_argument("texts", nargs="*", help="input texts")
        p.add_argument("--file", help="a file with one input text per line")
        if name == "vary":
            p.add_argument("--strength", type=float, default=0.3, help="fraction of T to noise to, in [0, 1] (default 0.3)")
            _add_sampling_flags(p)
        _add_common_flags(p)

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
    _add_common_flags(p)

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
    _add_training_flags(q)
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

    p = sub.add_parser("bench", help="latency per stage (encode, sampling loop, decode) and end to end, per backend")
    p.add_argument("checkpoint", nargs="?", help="checkpoint (or export) directory; omit it to use --preset")
    p.add_argument("--preset", choices=sorted(PRESETS), help="benchmark a preset's sizes with random weights")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=["auto"],
                   help="backends to compare (default auto); onnx exports a checkpoint or preset to a temp folder")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64], help="batch sizes (default 1 8 64)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default=None,
                   help="sampler (default: the checkpoint's own; for --preset, the design's ddpm, 1000 steps)")
    p.add_argument("--steps", type=int, default=None, help="steps of ddim or dpm++2m (default 50 and 20)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="engine dtype (default float32); the reference runs float32 regardless")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch and ONNX Runtime alike (default 0: each library's default)")
    p.add_argument("--int8", action="store_true", help="with onnx: also time its int8 graphs")
    p.add_argument("--onnx-cuda-graph", action="store_true",
                   help="with onnx on CUDA: also time it with the reverse graph as ONNX Runtime CUDA graphs")
    p.add_argument("--no-progress", action="store_true", help="turn the progress bar off")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (default 1)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (default 5)")
    p.add_argument("--num-beams", type=int, default=4, help="beams of the decode (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="decode length bound (default 64)")
    _add_trust_flag(p)
    p.add_argument("--json", metavar="FILE", help="write the rows and settings as JSON to FILE")
    p.add_argument("--plot", metavar="FILE", help="draw latency against batch size per backend into FILE (png)")

    p = sub.add_parser("export", help="export a checkpoint to ONNX graphs (backend onnx) or AOTInductor packages "
                                      "(backend aoti) and a manifest")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("outdir", help="new directory for the graphs, tokenizers and manifest.json")
    p.add_argument("--format", choices=("onnx", "aoti"), default="onnx",
                   help="onnx: ONNX graphs for ONNX Runtime (default), data; aoti: AOTInductor packages compiled "
                        "for this CPU (float32; minutes to compile, nothing compiles at load), which are native code: "
                        "signed with your key, so your ldlm loads them; anyone else's needs --trust-native-code")
    p.add_argument("--no-fp16", action="store_true", help="onnx: skip the float16 graphs")
    p.add_argument("--no-int8", action="store_true", help="onnx: skip the int8 reverse transformer and decoder step")
    p.add_argument("--opset", type=int, default=18, help="onnx: ONNX opset (default 18)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUTDIR (never anything else)")

    p = sub.add_parser("info", help="describe a checkpoint or an ONNX export")
    p.add_argument("checkpoint", help="checkpoint or export directory")

    p = sub.add_parser("demo", help="train the small preset on text shipped with Python (cached), then sample")
    p.add_argument("--data", nargs="+", metavar="FILE", help="train on these files instead of Python's documentation")
    p.add_argument("--cache-dir", default=None, help="where the trained demo model is kept (default ~/.cache/ldlm)")
    # the defaults are ldlm.demo's DEMO_*_STEPS, written out so that --help imports no torch (a test checks them)
    p.add_argument("--decoder-steps", type=int, default=400,
                   help="decoder training steps (default 400: about 8 minutes all told on an idle 2-core CPU)")
    p.add_argument("--diffusion-steps", type=int, default=300, help="reverse transformer training steps (default 300)")
    p.add_argument("-n", "--num-samples", type=int, default=5, help="unconditional samples to print (default 5)")
    p.add_argument("--no-progress", action="store_true", help="turn progress bars off")
    return parser


def _reused_stages(out: str) -> dict[str, str]:
    """The stages a saved run reused from other checkpoints ({"decoder": path, ...}), so that --resume
    needs neither their --*-from flags again nor step limits for them."""
    state = Path(out) / "training" / "state.json"
    return json.loads(state.read_text()).get("reused", {}) if state.is_file() else {}


def cmd_train(args) -> None:
    from ldlm.model.config import ModelConfig
    from ldlm.training.data import read_conditional_corpus, read_corpus
    from ldlm.training.train import TrainConfig, train

    condition_field = args.source_field or args.label_field
    conditions = None
    if condition_field:
        texts, conditions = read_conditional_corpus(args.data, args.text_field, condition_field)
    else:
        texts = read_corpus(args.data, args.text_field)
    print(f"training preset {args.preset!r} on {len(texts)} texts from {', '.join(args.data)} -> {args.out}")
    reused = _reused_stages(args.out) if args.resume else {}
    train_config = TrainConfig(
        time_budget=args.time_budget or None, decoder_share=args.decoder_share, decoder_steps=args.decoder_steps,
        diffusion_steps=args.diffusion_steps, decoder_batch_size=args.decoder_batch_size,
        diffusion_batch_size=args.diffusion_batch_size, eval_every=args.eval_every, save_every=args.save_every,
        seed=args.seed, decoder_noise=args.decoder_noise, ema_decay=args.ema_decay, device=args.device,
        precision=args.precision, condition_dropout=args.condition_dropout,
        decoder_from=args.decoder_from or reused.get("decoder"),
        reverse_from=args.reverse_from or reused.get("diffusion"),
    )
    overrides = {k: v for k, v in (("encoder", args.encoder), ("decoder", args.decoder)) if v is not None}
    if args.self_condition:
        overrides["self_condition"] = True
    if condition_field:
        overrides["condition"] = "text" if args.source_field else "label"
    if args.condition_attention or args.guidance is not None:
        if not condition_field:
            raise ValueError("--condition-attention and --guidance set up a conditional model: add --source-field "
                             "or --label-field")
        overrides.update({k: v for k, v in (("condition_attention", args.condition_attention),
                                            ("guidance", args.guidance)) if v is not None})
    for field in ("sampler", "sampling_steps", "decoding", "top_p"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    overrides.update(size_overrides(args.preset, args.max_text_tokens, args.latent_tokens))
    summary = train(texts, args.out, ModelConfig.from_preset(args.preset, **overrides), train_config,
                    conditions=conditions, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))


def _onnx_options(args):
    from ldlm.runtimes.onnx_runtime import OnnxOptions

    return OnnxOptions(provider=args.onnx_provider, intra_op_threads=args.onnx_threads,
                       optimization_level=args.onnx_opt_level, int8_reverse=args.int8,
                       int8_decoder=args.int8, cuda_graph=args.onnx_cuda_graph)


def _load(args):
    from ldlm.pipeline import load

    pipe = load(args.checkpoint, device=args.device, backend=args.backend, dtype=args.dtype,
                onnx_options=_onnx_options(args), trust_native_code=args.trust_native_code)
    print(f"backend: {pipe.backend} ({pipe.backend_reason})", file=sys.stderr)
    return pipe


def _conditions_from_args(args) -> tuple[str, list[str]] | None:
    """("sources" or "labels", the list) from --source / --source-file / --label, or None."""
    sources = list(args.source or [])
    if args.source_file:
        sources += [line.strip() for line in _read_text_file(args.source_file, "--source-file").splitlines()
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


MAX_CLI_SAMPLES = 1_000_000  # one command's -n (times its sources); a job's resume keeps a key per record
MAX_JOB_BATCH = 4096  # a batch job's --batch-size


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
    if args.ray:
        return _print_ray_job(args, conditions)
    pipe = _load(args)
    _check_conditions_fit(args, pipe.config, conditions)
    sampler, steps = pipe.sampling(args.sampler, args.steps)
    common = dict(steps=args.steps, sampler=args.sampler, seed=args.seed, eta=args.eta, num_beams=args.num_beams,
                  decoding=args.decoding, top_p=args.top_p, progress=not args.no_progress)
    if conditions is None:  # printed a batch at a time, as each ends: memory stays flat for any -n
        printed = 0
        for texts in pipe.generate_batches(_sample_count(args), **common):
            _print_results(args, [None] * len(texts), texts, first_index=printed, sampler=sampler, steps=steps,
                           seed=args.seed)
            sys.stdout.flush()
            printed += len(texts)
        return
    kind, given = conditions
    each = _each_condition(args, given)
    guidance = pipe.config.guidance if args.guidance is None else args.guidance
    i = 0
    for texts in pipe.generate_batches(len(each), **common, **{kind: each}, guidance=args.guidance):
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

    from ldlm.jobs.batch import JobSettings, model_fingerprint, read_input_file, run_job, unconditional_items

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
                           guidance=args.guidance)
    if input_path:
        items = read_input_file(input_path, args.seed, output=output_path)
    else:
        items = unconditional_items(_sample_count(args), args.seed)
    if args.ray:
        from ldlm.jobs.ray_jobs import run_job_on_ray

        load_kwargs = {"backend": args.backend, "dtype": args.dtype, "onnx_options": _onnx_options(args),
                       "trust_native_code": args.trust_native_code}
        counts = run_job_on_ray(args.checkpoint, list(items), output_path, settings, load_kwargs=load_kwargs,
                                batch_size=args.batch_size, resume=args.resume, workers=args.ray_workers,
                                address=args.ray_address, progress=not args.no_progress)
    else:
        total = None if input_path else _sample_count(args)
        counts = run_job(_load(args), items, output_path, settings, batch_size=args.batch_size, resume=args.resume,
                         progress=not args.no_progress, total=total)
    if report:
        print(f"{output_path}: {counts['written']} written, {counts['errors']} bad lines reported, "
              f"{counts['skipped']} already done", file=sys.stderr)


def cmd_reconstruct(args) -> None:
    texts = _texts_from_args(args)
    outputs = _load(args).reconstruct(texts, num_beams=args.num_beams, progress=not args.no_progress)
    _print_results(args, texts, outputs)


def cmd_vary(args) -> None:
    texts = _texts_from_args(args)
    pipe = _load(args)
    outputs = pipe.vary(texts, args.strength, steps=args.steps, sampler=args.sampler, seed=args.seed, eta=args.eta,
                        num_beams=args.num_beams, progress=not args.no_progress)
    sampler, _ = pipe.sampling(args.sampler, args.steps)
    _print_results(args, texts, outputs, strength=args.strength, sampler=sampler, seed=args.seed)


def cmd_eval(args) -> None:
    from ldlm.training.data import read_corpus, read_texts
    from ldlm.evaluation.evaluate import EvalSettings, evaluate, format_table

    if args.checkpoint is None and args.samples is None:
        raise ValueError("give a checkpoint, --samples FILE, or both")
    settings = EvalSettings(num_samples=args.num_samples, seed=args.seed, sampler=args.sampler, steps=args.steps,
                            num_beams=args.num_beams, decoding=args.decoding, top_p=args.top_p,
                            reconstruction=not args.no_reconstruction)
    result = evaluate(read_texts(args.references, args.text_field), read_corpus(args.train, args.text_field),
                      pipe=_load(args) if args.checkpoint else None,
                      samples=read_texts(args.samples, args.text_field) if args.samples else None,
                      settings=settings, progress=not args.no_progress)
    print(format_table(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, ensure_ascii=False))


def cmd_baseline(args) -> None:
    from ldlm.training.baseline import generate_from_language_model, sample_language_model, train_language_model
    from ldlm.model.config import ModelConfig
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
        sources = [line.strip() for line in _read_text_file(args.source_file, "--source-file").splitlines()
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


def cmd_bench(args) -> None:
    import dataclasses
    import importlib.util
    import tempfile

    import torch

    from ldlm.runtimes.backends import EXPORT_BACKENDS, resolve_backend
    from ldlm.jobs.benchmark import BenchSettings, bench_components, bench_pipeline, export_for_bench, format_table, plot
    from ldlm.model.checkpoint import load_checkpoint
    from ldlm.export.manifest import is_export
    from ldlm.inputs import resolve_device
    from ldlm.runtimes.onnx_runtime import OnnxOptions
    from ldlm.pipeline import Pipeline, load

    if (args.checkpoint is None) == (args.preset is None):
        raise ValueError("give a checkpoint directory or --preset NAME (not both)")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib: pip install 'ldlm[bench]' (or drop --plot)")
    sampler = args.sampler or ("ddpm" if args.preset else None)  # a preset's random weights: the design's DDPM
    settings = BenchSettings(batch_sizes=tuple(args.batch_sizes), sampler=sampler, steps=args.steps,
                             warmup=args.warmup, iters=args.iters, num_beams=args.num_beams,
                             max_new_tokens=args.max_new_tokens)
    device = resolve_device(args.device)
    for backend in args.backends:  # fail before any work when a backend cannot run here
        if backend not in EXPORT_BACKENDS and not (args.checkpoint and is_export(args.checkpoint)):
            resolve_backend(backend, device)
    if args.threads < 0:
        raise ValueError(f"--threads must be 0 (the libraries' defaults) or more, got {args.threads}")
    if args.onnx_cuda_graph and ("onnx" not in args.backends or device.type != "cuda"):
        raise ValueError("--onnx-cuda-graph times the onnx backend's CUDA graphs: add onnx to --backends and run "
                         "with --device cuda (onnxruntime-gpu)")
    if args.threads:
        torch.set_num_threads(args.threads)
    components = None
    rows = []

    def run(pipe, name: str, dtype: str) -> None:
        name = name if dtype == "float32" else f"{name} {dtype}"
        print(f"benchmarking {name} ({pipe.backend_reason})", file=sys.stderr)
        rows.extend(bench_pipeline(pipe, name, settings, progress=not args.no_progress))

    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            dtype = "float32" if backend in ("reference", "compiled", "aoti") else args.dtype
            options = OnnxOptions(intra_op_threads=args.threads)
            if args.checkpoint and is_export(args.checkpoint):
                path = args.checkpoint
            elif backend in EXPORT_BACKENDS:  # exported here first, untimed
                source = args.checkpoint or components or bench_components(args.preset)
                path = export_for_bench(source, backend, dtype, f"{tmp}/{backend}", int8=args.int8)
            else:
                if components is None:
                    components = load_checkpoint(args.checkpoint) if args.checkpoint else bench_components(args.preset)
                pipe = Pipeline(components, args.device, backend, dtype)
                run(pipe, pipe.backend, dtype)
                continue
            # an export this run wrote in its temporary folder is signed with this user's key
            pipe = load(path, device=args.device, backend=backend, dtype=dtype, onnx_options=options,
                        trust_native_code=args.trust_native_code)
            run(pipe, pipe.backend, dtype)
            if args.int8 and pipe.backend == "onnx":
                int8 = dataclasses.replace(options, int8_reverse=True, int8_decoder=True)
                run(load(path, device=args.device, dtype=dtype, onnx_options=int8), "onnx int8", dtype)
            if args.onnx_cuda_graph and pipe.backend == "onnx":
                graphs = dataclasses.replace(options, cuda_graph=True)
                run(load(path, device=args.device, dtype=dtype, onnx_options=graphs), "onnx cuda-graph", dtype)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2, default=str))
    if args.plot:
        plot(rows, args.plot)


def cmd_export(args) -> None:
    from ldlm.export.onnx_export import export_checkpoint

    if args.format == "aoti":
        from ldlm.export.aoti_export import export_aoti

        export_aoti(args.checkpoint, args.outdir, overwrite=args.overwrite)
        return
    variants = ("float32",) if args.no_fp16 else ("float32", "float16")
    export_checkpoint(args.checkpoint, args.outdir, variants=variants, int8=not args.no_int8, opset=args.opset,
                      overwrite=args.overwrite)


def cmd_info(args) -> None:
    from ldlm.model.checkpoint import load_checkpoint
    from ldlm.export.manifest import graph_format, is_export, read_manifest, signed_by_this_user

    if is_export(args.checkpoint):  # an export (ONNX or AOTI): its manifest, checked, never a graph opened
        manifest = read_manifest(args.checkpoint)
        native = None
        if graph_format(manifest) == "aoti":
            native = ("AOTInductor packages: signed by your key, so they load" if signed_by_this_user(manifest) else
                      "AOTInductor packages not signed by your key: they load only with --trust-native-code")
        graphs = {variant: {name: {"file": g["file"], "inputs": [i["name"] for i in g["inputs"]],
                                   "outputs": [o["name"] for o in g["outputs"]]} for name, g in specs.items()}
                  for variant, specs in manifest["graphs"].items()}
        print(json.dumps({"export": str(args.checkpoint), "format": manifest["format"], "opset": manifest.get("opset"),
                          "exporter": manifest["exporter"], "target": manifest.get("target"),
                          "versions": manifest["versions"], "model": manifest["model"], "graphs": graphs,
                          "files": len(manifest["files"]), "hashes": "verified", "native_code": native}, indent=2))
        return

    c = load_checkpoint(args.checkpoint)
    meta = json.loads((Path(args.checkpoint) / "config.json").read_text())
    n_params = {name: sum(p.numel() for p in module.parameters())
                for name, module in (("encoder", c.encoder), ("reverse", c.reverse), ("decoder", c.decoder))}
    state_file = Path(args.checkpoint) / "training" / "state.json"
    info = {
        "checkpoint": str(args.checkpoint),
        "ldlm_version": meta["ldlm_version"],
        "encoder": (f"bundled ({'from ' + c.config.encoder if c.config.encoder else 'built in code'})"
                    if c.encoder_bundled else c.config.encoder),
        "latent_dim": c.config.latent_dim,
        "latent_shape": list(c.config.latent_shape),
        "parameters": n_params,
        "decoder_vocab": len(c.decoder.tokenizer),
        "model": c.config.to_dict(),
        "training": json.loads(state_file.read_text()) if state_file.is_file() else None,
    }
    print(json.dumps(info, indent=2))


def cmd_demo(args) -> None:
    from ldlm.demo import run_demo

    run_demo(data=args.data, cache_dir=args.cache_dir, decoder_steps=args.decoder_steps,
             diffusion_steps=args.diffusion_steps, num_samples=args.num_samples, progress=not args.no_progress)


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "reconstruct": cmd_reconstruct, "vary": cmd_vary,
            "eval": cmd_eval, "baseline": cmd_baseline, "export": cmd_export, "bench": cmd_bench, "info": cmd_info, "demo": cmd_demo}


# the pip extra that brings each optional package (pyproject.toml), for a one-line error when it is missing
EXTRA_OF_MODULE = {"sacrebleu": "eval", "mauve": "eval", "wordfreq": "eval", "onnx": "onnx", "onnxscript": "onnx",
                   "onnxruntime": "onnx", "ray": "ray", "matplotlib": "bench", "triton": "gpu"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars say nothing to a CLI user
    from ldlm.model.checkpoint import CheckpointError

    try:
        COMMANDS[args.command](args)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError, BackendUnavailable) as e:
        print(f"ldlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read or write the system refused (disk full, permissions): say where
        where = f" ({e.filename})" if e.filename else ""
        print(f"ldlm {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = EXTRA_OF_MODULE.get((e.name or "").split(".")[0])
        if extra is None:  # not an optional package: a broken install, whose traceback helps
            raise
        print(f"ldlm {args.command}: error: this needs {e.name}, which is not installed: "
              f"pip install 'ldlm[{extra}]'", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
