"""Batch generation jobs: JSONL in, JSONL out, in input order, crash-safe and resumable (ldlm.jobs.items reads
the input, ldlm.jobs.output holds the output file, ldlm.jobs.settings what keys a resume).

Each input line is an object with an `id` (a string or a number) and either nothing more (an unconditional
sample; optional `seed`), or a `text` with a `mode`: `reconstruct` (the default) or `vary` (optional `strength`
in [0, 1], default 0.3; optional `seed`), or, for a conditional model, a `source` text or a `label` to generate
from (optional `seed`, `guidance`). Any other field is an error of that line, so a typo never runs at a
default. Every item draws its noise from its own seed (ldlm.sampling.samplers.ItemNoise), so an output depends on the
item alone: not on its batch, on a resume, or on which worker ran it. A seed not given is derived from the
job's seed and the id, and written out.

Output lines echo the id, the text out, the seed and the settings. They are appended and flushed (and
fsync'ed) batch by batch, so a crash loses at most the batch in flight. The job holds an exclusive lock on its
output file, so two jobs never write one file. `resume=True` continues a file that ldlm wrote (anything else is
refused untouched): it skips the lines already written under the same settings, keyed on the id and a hash of
the line's request, so a line edited since runs again (its new record follows the old one: an id's last
record is its current one), and it refuses when the settings or the model changed. A bad line gets an output
line with its error and never stops the others; so does a line whose item fails while the rest of its batch
runs.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldlm.evaluation.rerank import check_reranking
from ldlm.jobs.items import Item
from ldlm.jobs.output import JobOutput, output_record
from ldlm.jobs.settings import JobSettings, resolved_settings
from ldlm.model.encoder import token_lengths
from ldlm.sampling.guidance import check_condition

log = logging.getLogger("ldlm.jobs")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_items(pipe, items: list[Item], settings: JobSettings) -> list[str]:
    """The texts for a list of valid items, in order: samples, reconstructions and variations batched together
    for the decode. The encoder's truncation warnings are left out: they name a position in a batch, and
    mark_truncated has already said it of each line, by its id."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"text \d+ has \d+ encoder tokens")
        return _run_items(pipe, items, settings)


def _run_items(pipe, items: list[Item], settings: JobSettings) -> list[str]:
    latents = torch.empty(len(items), *pipe.config.latent_shape, device=pipe.device)
    samples = [i for i, item in enumerate(items) if item.mode == "sample" and not _conditional(item)]
    if samples:
        latents[samples] = pipe.sample_latents(len(samples), steps=settings.steps, sampler=settings.sampler,
                                               eta=settings.eta, seeds=[items[i].seed for i in samples],
                                               temperature=settings.temperature, batch_size=len(samples),
                                               progress=False)
    reranked: dict[int, str] = {}  # conditional items' texts, chosen among their candidates
    conditional = [i for i, item in enumerate(items) if _conditional(item)]
    for guidance in dict.fromkeys(_guidance(items[i], settings) for i in conditional):  # in order of appearance
        group = [i for i in conditional if _guidance(items[i], settings) == guidance]
        kind = "sources" if items[group[0]].source is not None else "labels"
        given = [items[i].source if kind == "sources" else items[i].label for i in group]
        seeds = [items[i].seed for i in group]
        sampling = dict(steps=settings.steps, sampler=settings.sampler, eta=settings.eta, guidance=guidance,
                        temperature=settings.temperature, progress=False, **{kind: given})
        if settings.candidates == 1:
            latents[group] = pipe.sample_latents(len(group), seeds=seeds, batch_size=len(group), **sampling)
        else:  # each item's candidates sampled and decoded together, one kept
            texts = pipe.generate_from(seeds=seeds, candidates=settings.candidates, rerank=settings.rerank,
                                       num_beams=settings.num_beams, decoding="beam",
                                       batch_size=len(group) * settings.candidates, **sampling)
            reranked.update(zip(group, texts))
    clean = [i for i, item in enumerate(items) if item.mode == "reconstruct"]
    if clean:
        latents[clean] = pipe.encode([items[i].text for i in clean])
    for strength in sorted({item.strength for item in items if item.mode == "vary"}):
        group = [i for i, item in enumerate(items) if item.mode == "vary" and item.strength == strength]
        latents[group] = pipe.vary_latents([items[i].text for i in group], strength, settings.steps, settings.sampler,
                                           eta=settings.eta, seeds=[items[i].seed for i in group], progress=False)
    rest = [i for i in range(len(items)) if i not in reranked]
    decoded = pipe.decode(latents[rest], num_beams=settings.num_beams, batch_size=max(1, len(rest)),
                          progress=False) if rest else []
    texts = {**reranked, **dict(zip(rest, decoded))}
    return [texts[i] for i in range(len(items))]


def _conditional(item: Item) -> bool:
    return item.source is not None or item.label is not None


def _guidance(item: Item, settings: JobSettings) -> float | None:
    return item.guidance if item.guidance is not None else settings.guidance


def mark_bad_conditions(config, items: list[Item], settings: JobSettings) -> None:
    """Conditional lines checked against the model before any work (ldlm.sampling.guidance.check_condition): an
    unconditional model, the wrong kind or an unknown label is that line's error; so is a source that the
    job's reranking cannot read (rerank "slots" reads E2E meaning representations)."""
    for item in items:
        if item.error is None and _conditional(item):
            sources = [item.source] if item.source is not None else None
            try:
                check_condition(config, 1, sources, [item.label] if item.label is not None else None)
                check_reranking(settings.candidates, settings.rerank, sources, name="its source")
            except (ValueError, TypeError) as e:
                item.error = f"id {item.id!r}: {e}"


def _failure(item: Item, error: Exception) -> str:
    return (f"id {item.id!r}: generation failed ({type(error).__name__}: {str(error)[:300]}); the other lines ran. "
            "Fix the line, or report the failure, and run again with --resume")


def run_isolating_failures(pipe, items: list[Item], settings: JobSettings, size: int) -> tuple[list[str | None], int]:
    """run_items in chunks of `size`: halved on out-of-memory (and logged) until they fit. A chunk that fails
    for another reason runs again one item at a time: an item that fails alone while others succeed gets its
    error (set on the item, its text None), and the rest run; when every item of a chunk fails, the failure is
    not an item's and is raised. Returns the texts and the size that fit, for the next batch to start from."""
    texts: list[str | None] = []
    start = 0
    while start < len(items):
        chunk = items[start : start + size]
        try:
            texts += run_items(pipe, chunk, settings)
        except Exception as e:  # noqa: BLE001 (sorted below: memory, one item's failure, or the job's)
            if is_out_of_memory(e) and size > 1:
                size = max(1, size // 2)
                log.warning("out of memory at a batch of %d items: retrying at %d", len(chunk), size)
                if pipe.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            if len(chunk) == 1 or is_out_of_memory(e):
                raise
            texts += _one_at_a_time(pipe, chunk, settings, e)
        start += len(chunk)
    return texts, size


def _one_at_a_time(pipe, chunk: list[Item], settings: JobSettings, first: Exception) -> list[str | None]:
    texts: list[str | None] = []
    for item in chunk:
        try:
            texts += run_items(pipe, [item], settings)
        except Exception as e:  # noqa: BLE001
            if is_out_of_memory(e):
                raise
            item.error = _failure(item, e)
            texts.append(None)
    if all(text is None for text in texts):
        raise first
    log.warning("%d of %d items of a batch failed on their own; their lines report why", texts.count(None), len(chunk))
    return texts


def run_job(pipe, items: Iterable[Item], output: str | Path, settings: JobSettings, *, batch_size: int = 64,
            resume: bool = False, progress: bool = True, total: int | None = None) -> dict:
    """Run `items` through `pipe`, appending their records to `output` in input order, a batch at a time: items
    are read from the iterable as the job reaches them, so memory stays flat for any length, and a kill loses at
    most the batch in flight (`resume` continues). `total`: the count for the progress bar when `items` has no
    len(). Returns counts."""
    settings = resolved_settings(settings, pipe.config)
    total = len(items) if total is None and hasattr(items, "__len__") else total
    counts = {"written": 0, "errors": 0, "skipped": 0}
    with JobOutput(output, settings, resume) as out, \
            tqdm(total=total, desc="generate", unit="item", disable=not progress, dynamic_ncols=True) as bar:
        def skipped(k: int) -> None:
            counts["skipped"] += k
            bar.update(k)

        size = batch_size
        for batch in out.pending_batches(items, batch_size, skipped):
            mark_bad_conditions(pipe.config, batch, settings)
            mark_truncated(pipe, batch)
            valid = [item for item in batch if item.error is None]
            texts, size = run_isolating_failures(pipe, valid, settings, size)
            by_item = dict(zip(map(id, valid), texts))
            records = [output_record(item, by_item.get(id(item)), settings) for item in batch]
            out.write(records)
            counts["written"] += sum("error" not in r for r in records)
            counts["errors"] += sum("error" in r for r in records)
            bar.update(len(batch))
    return counts


def mark_truncated(pipe, items: list[Item]) -> None:
    """Texts (and source texts) over the encoder's limit are truncated (as the API does, with a warning); their
    lines say so."""
    with_text = [item for item in items if item.error is None and (item.text or item.source) is not None]
    if not with_text:
        return
    tokenizer, limit = pipe.encoder.tokenizer, pipe.encoder.max_tokens
    lengths = token_lengths(tokenizer, [item.text if item.text is not None else item.source for item in with_text])
    for item, n in zip(with_text, lengths):
        if n > limit:
            what = "text" if item.text is not None else "source"
            item.extra["truncated"] = True
            item.extra["warning"] = f"the {what} has {n} encoder tokens, over the limit of {limit}: its end was cut"
            log.warning("%s: %s", item.ident, item.extra["warning"])
