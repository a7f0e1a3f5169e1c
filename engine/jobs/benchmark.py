"""`ldlm bench`: latency of each stage (encode, sampling loop, decode) and end to end, per backend and batch size.

A preset is benchmarked with random weights built from its config (no downloads; random GPT-2 weights never
emit EOS, so every decode runs the full `max_new_tokens`: a fixed worst case), a checkpoint with its own.
Warm-up iterations are excluded; each figure is the median, p90 and p99 over the timed iterations, and
samples/s is the batch over the median.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from ldlm.inputs import check_positive_int
from ldlm.model.checkpoint import Components
from ldlm.model.config import ModelConfig
from ldlm.model.decoder import LatentDecoder, train_bpe_tokenizer
from ldlm.model.encoder import LatentEncoder, build_tiny_encoder
from ldlm.model.resampler import LatentResampler
from ldlm.model.reverse import ReverseTransformer

STAGES = ("encode", "loop", "loop_conditional", "loop_guided", "decode", "end_to_end")
CONDITIONAL_STAGES = ("loop_conditional", "loop_guided")  # timed only for a conditional model
GUIDED = 2.0  # the guidance weight the guided loop is timed at (any w other than 0 and 1 costs the same)

# BERT sizes standing in for each preset's pretrained encoder (bert-base-uncased, all-MiniLM-L6-v2)
ENCODER_SIZES = {"base": {"num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
                 "small": {"num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}}


def export_for_bench(source, backend: str, dtype: str, out: str, int8: bool = False):
    """A checkpoint (directory or Components) exported to `out` for backend "onnx" (float32 graphs, `dtype`'s too,
    the int8 reverse transformer if asked) or "aoti" (float32 packages), quietly; returns `out`."""
    quiet = {"log": lambda *_: None}
    if backend == "aoti":
        from ldlm.export.aoti_export import export_aoti

        return export_aoti(source, out, **quiet)
    from ldlm.export.onnx_export import export_checkpoint

    variants = ("float32",) if dtype == "float32" else ("float32", dtype)
    return export_checkpoint(source, out, variants=variants, int8=int8, **quiet)


def bench_components(preset: str, vocab_size: int | None = None, seed: int = 0) -> Components:
    """The preset's encoder, reverse transformer and GPT-2 decoder at full size with random weights. The
    tokenizers are small (the encoder's reads characters; the decoder's only supplies EOS): token counts, not
    vocabularies, set the cost."""
    config = dataclasses.replace(ModelConfig.from_preset(preset), encoder=None)  # the encoder is built here
    tiny = build_tiny_encoder(config.latent_dim, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if preset in ENCODER_SIZES:
            bert = BertModel(BertConfig(vocab_size=tiny.model.config.vocab_size, hidden_size=config.latent_dim,
                                        max_position_embeddings=512, **ENCODER_SIZES[preset]))
            encoder = LatentEncoder(bert, tiny.tokenizer)
        else:
            encoder = tiny
        if config.latent_tokens > 1:  # K latent tokens: the resampler is part of encoding, as in a trained model
            encoder.resampler = LatentResampler(config).eval()
        tokenizer = train_bpe_tokenizer(["a small corpus for the benchmark's tokenizer"], 300)
        gpt2 = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab_size or config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
            n_layer=config.n_layer, n_head=config.n_head, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        decoder = LatentDecoder(config, gpt2, tokenizer).eval()
        reverse = ReverseTransformer(config).eval()
    zeros = torch.zeros(config.latent_shape)  # identity statistics, one per latent entry
    return Components(config, encoder, decoder, reverse, zeros, zeros + 1, True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> dict:
    """Median, p90 and p99 seconds of `fn` over `iters` runs after `warmup` runs; `first_call_s`, the first
    warm-up run alone: what compiling, capturing graphs and allocating cost (None without warm-up)."""
    first = None
    for i in range(warmup):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            first = time.perf_counter() - start
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    times.sort()

    def pct(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    return {"median_s": statistics.median(times), "p90_s": pct(0.9), "p99_s": pct(0.99), "iters": iters,
            "first_call_s": first}


@dataclass(frozen=True)
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8, 64)
    sampler: str | None = None  # None: the pipeline's own (its checkpoint's default)
    steps: int | None = None  # steps of ddim or dpm++2m (None: the sampler's default; ddpm runs all T)
    warmup: int = 1
    iters: int = 5
    num_beams: int = 4
    max_new_tokens: int = 64
    text_words: int = 24  # words per input text of the encode stage

    def __post_init__(self) -> None:
        if not self.batch_sizes:
            raise ValueError("give at least one batch size")
        for size in self.batch_sizes:
            check_positive_int(size, "each batch size")
        check_positive_int(self.iters, "iters")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a whole number >= 0, got {self.warmup!r}")


def bench_texts(n: int, words: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [" ".join(letters[(i + j) % 26] * 3 for j in range(words)) for i in range(n)]


def bench_pipeline(pipe, name: str, settings: BenchSettings, progress: bool = True) -> list[dict]:
    """One row per (batch size, stage) for a loaded pipeline; a conditional one also times its loop reading a
    condition (texts of the encode stage as sources, or its labels in turn), alone and guided. Rows name the
    sampler and steps that ran; a bar shows the backend, batch, stage and the time left."""
    rows = []
    sampler, steps = pipe.sampling(settings.sampler, settings.steps)
    stage_count = len(STAGES) if pipe.config.condition is not None else len(STAGES) - len(CONDITIONAL_STAGES)
    bar = tqdm(total=len(settings.batch_sizes) * stage_count * (settings.warmup + settings.iters), desc=name,
               unit="run", disable=not progress, leave=False, dynamic_ncols=True)
    for batch in settings.batch_sizes:
        texts = bench_texts(batch, settings.text_words)
        sample = {"steps": steps, "sampler": sampler, "seed": 0, "batch_size": batch, "progress": False}
        latents = pipe.sample_latents(batch, **{**sample, "sampler": "ddim", "steps": 2})
        decode = {"num_beams": settings.num_beams, "max_new_tokens": settings.max_new_tokens, "batch_size": batch,
                  "progress": False}

        def end_to_end(texts=texts, batch=batch):
            pipe.encode(texts)
            pipe.decode(pipe.sample_latents(batch, **sample), **decode)

        stages = {"encode": lambda texts=texts: pipe.encode(texts),
                  "loop": lambda batch=batch: pipe.sample_latents(batch, **sample),
                  "decode": lambda latents=latents: pipe.decode(latents, **decode),
                  "end_to_end": end_to_end}
        if pipe.config.condition is not None:  # the loop reading a condition: w = 1 (one branch), guided (both)
            given = ({"sources": texts} if pipe.config.condition == "text" else
                     {"labels": [pipe.config.labels[i % len(pipe.config.labels)] for i in range(batch)]})
            stages["loop_conditional"] = lambda batch=batch, given=given: pipe.sample_latents(
                batch, guidance=1.0, **given, **sample)
            stages["loop_guided"] = lambda batch=batch, given=given: pipe.sample_latents(
                batch, guidance=GUIDED, **given, **sample)
        for stage, fn in stages.items():
            bar.set_postfix_str(f"batch {batch}, {stage}")

            def counted(fn=fn):
                fn()
                bar.update(1)

            result = timed(counted, pipe.device, settings.warmup, settings.iters)
            rows.append({"backend": name, "batch": batch, "stage": stage, "sampler": sampler, "steps": steps,
                         **result, "samples_per_s": batch / result["median_s"]})
    bar.close()
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| backend | batch | stage | median | p90 | p99 | samples/s | first call |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        first = "-" if r.get("first_call_s") is None else f"{r['first_call_s'] * 1e3:.1f} ms"
        lines.append(f"| {r['backend']} | {r['batch']} | {r['stage']} | {r['median_s'] * 1e3:.1f} ms | "
                     f"{r['p90_s'] * 1e3:.1f} ms | {r['p99_s'] * 1e3:.1f} ms | {r['samples_per_s']:.1f} | {first} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Latency against batch size, one line per backend, one panel per stage."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if any(r["stage"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for backend in dict.fromkeys(r["backend"] for r in rows):
            points = sorted((r["batch"], r["median_s"] * 1e3) for r in rows if r["backend"] == backend and r["stage"] == stage)
            if points:
                ax.plot(*zip(*points), marker="o", label=backend)
        ax.set(title=stage, xlabel="batch size", ylabel="median latency (ms)", xscale="log", yscale="log")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
