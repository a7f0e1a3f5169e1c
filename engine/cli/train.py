"""`ldlm train`: a model on text, both stages."""

from __future__ import annotations

import json
from pathlib import Path

from ldlm.cli.flags import add_training_flags
from ldlm.model.config import PRESETS, SAMPLER_NAMES, size_overrides


def add_parsers(sub) -> None:
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
    p.add_argument("--holdout-by", choices=["line", "source"], default="line",
                   help="validation lines: random lines (default), or every line of some sources (a model "
                        "conditioned on --source-field), so the held-out loss is that of sources never seen")
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
    add_training_flags(p)
    p.add_argument("--no-progress", action="store_true", help="turn progress bars off")


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
        precision=args.precision, condition_dropout=args.condition_dropout, holdout_by=args.holdout_by,
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


# the command each parser of this group runs
COMMANDS = {"train": cmd_train}
