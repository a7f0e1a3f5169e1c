"""Batch generation jobs: JSONL in, JSONL out, in input order, crash-safe and resumable.

Each input line is an object with an `id` and either nothing more (an unconditional sample; optional `seed`)
or a `text` with a `mode`: `reconstruct` (the default) or `vary` (optional `strength` in [0, 1], default 0.3;
optional `seed`). Every item draws its noise from its own seed (ldlm.samplers.ItemNoise), so an output depends
on the item alone: not on its batch, on a resume, or on which worker ran it. A seed not given is derived from
the job's seed and the id, and written out.

Output lines echo the id, the text out, the seed and the settings. They are appended and flushed (and
fsync'ed) batch by batch, so a crash loses at most the batch in flight; `resume=True` skips the ids already
written under the same settings (keyed on id + a hash of the settings) and refuses when they changed. A bad
line gets an output line with its error and never stops the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .encoder import token_lengths
from .inputs import check_strength

log = logging.getLogger("ldlm.jobs")
MODES = ("reconstruct", "vary")


@dataclass(frozen=True)
class JobSettings:
    """What decides the outputs besides each item's own fields; hashed to guard `resume`."""

    model: str  # a fingerprint of the checkpoint or export (see model_fingerprint)
    sampler: str | None = None  # None: the checkpoint's default (it is part of the model fingerprint)
    steps: int | None = None
    eta: float = 0.0
    num_beams: int = 4
    dtype: str = "float32"
    seed: int = 0  # the job's seed, from which items without a seed get theirs

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def public(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def model_fingerprint(path: str | Path) -> str:
    """A short hash of what identifies a trained model: an export's manifest (it holds every file's hash), or a
    checkpoint's config and latent statistics (they change with every training run)."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in ("manifest.json", "config.json", "latent_stats.safetensors"):
        if (path / name).is_file():
            digest.update(name.encode() + (path / name).read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Item:
    """One input line: a valid request, or the error that makes it bad."""

    line: int  # 1-based line number in the input
    id: object = None
    mode: str = "sample"  # sample | reconstruct | vary
    text: str | None = None
    strength: float | None = None
    seed: int | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)  # e.g. {"truncated": True}
    duplicate: bool = False  # its id was used on an earlier line, so the id cannot identify it

    @property
    def key(self) -> str:
        """What `resume` recognizes an item by: its id, or its line when it has no usable id."""
        return f"id:{json.dumps(self.id)}" if self.id is not None and not self.duplicate else f"line:{self.line}"


def derived_seed(job_seed: int, item_id: object) -> int:
    """A stable 31-bit seed from the job's seed and the id: it does not move when lines are added or removed."""
    return int(hashlib.sha256(f"{job_seed}:{json.dumps(item_id)}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def parse_line(raw: bytes, line: int, job_seed: int) -> Item:
    """One input line -> an Item (with `error` set when the line is bad, naming what to fix)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Item(line, error=f"line {line} is not valid UTF-8 ({e.reason} at byte {e.start}): re-encode the file as UTF-8")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return Item(line, error=f"line {line} is not valid JSON ({e.msg} at column {e.colno}): write one JSON object per line")
    if not isinstance(record, dict):
        return Item(line, error=f"line {line} is a JSON {type(record).__name__}, not an object: write {{\"id\": ...}}")
    if "id" not in record or record["id"] is None or isinstance(record["id"], (dict, list)):
        return Item(line, error=f"line {line} has no usable \"id\" (a string or number): give each line a unique id")
    item = Item(line, id=record["id"])
    seed = record.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        item.error = f"id {item.id!r}: \"seed\" must be a whole number >= 0, got {seed!r}"
        return item
    item.seed = derived_seed(job_seed, item.id) if seed is None else seed
    if "text" not in record:
        if "mode" in record:
            item.error = f"id {item.id!r}: mode {record['mode']!r} needs a \"text\"; drop the mode for a sample"
        return item
    text, mode = record["text"], record.get("mode", "reconstruct")
    if not isinstance(text, str) or not text.strip():
        item.error = f"id {item.id!r}: \"text\" is empty or not a string: give a non-empty text, or drop it for a sample"
    elif mode not in MODES:
        item.error = f"id {item.id!r}: unknown mode {mode!r}; use one of {list(MODES)}"
    else:
        item.text, item.mode = text, mode
        if mode == "vary":
            strength = record.get("strength", 0.3)
            try:
                if isinstance(strength, bool):
                    raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
                check_strength(strength)
                item.strength = float(strength)
            except ValueError as e:
                item.error = f"id {item.id!r}: {e}"
    return item


def read_items(lines: Iterable[bytes], job_seed: int) -> list[Item]:
    """Parse every line (blank lines skipped) and mark duplicate ids, naming the first line that used them."""
    items, first_line = [], {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        item = parse_line(raw.rstrip(b"\r\n"), number, job_seed)
        if item.id is not None and item.error is None:
            key = json.dumps(item.id)
            if key in first_line:
                item.duplicate = True
                item.error = f"duplicate id {item.id!r} on line {number} (first on line {first_line[key]}): ids must be unique"
            else:
                first_line[key] = number
        items.append(item)
    return items


def unconditional_items(n: int, job_seed: int) -> list[Item]:
    """`--num-samples N` without an input file: ids 0 .. N-1."""
    return [Item(i + 1, id=i, seed=derived_seed(job_seed, i)) for i in range(n)]


def output_record(item: Item, text: str | None, settings: JobSettings) -> dict:
    record = {"id": item.id} if item.id is not None else {"line": item.line}
    if item.error is not None:
        return {**record, "error": item.error, "settings_hash": settings.hash(), "key": item.key}
    record.update({"text": text, "mode": item.mode, "seed": item.seed})
    if item.text is not None:
        record["input"] = item.text
    if item.strength is not None:
        record["strength"] = item.strength
    record.update(item.extra)
    return {**record, "settings": settings.public(), "settings_hash": settings.hash(), "key": item.key}


def done_keys(output: Path, settings: JobSettings) -> set[str]:
    """Keys already written to `output` under `settings`; refuses if the file holds other settings. A torn last
    line (a crash mid-write) is cut off so that appending starts on a fresh line."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with output.open("r+b") as f:
            f.truncate(cut)
        log.warning("%s ended in a partial line (an interrupted write): removed it; that item runs again", output)
        data = data[:cut]
    keys = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        record = json.loads(raw)
        if record.get("settings_hash") != settings.hash():
            raise ValueError(f"{output} line {number} was written with other settings ({record.get('settings')}); "
                             f"this run has {settings.public()} on model {settings.model}: resume with the same "
                             "settings, or write to a new --output")
        keys.add(record["key"])
    return keys


class OutputWriter:
    """Appends JSON lines; each `write` call is flushed and fsync'ed before it returns."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")

    def write(self, records: list[dict]) -> None:
        if records:
            self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_items(pipe, items: list[Item], settings: JobSettings) -> list[str]:
    """The texts for a list of valid items, in order: samples, reconstructions and variations batched together
    for the decode."""
    latents = torch.empty(len(items), *pipe.config.latent_shape, device=pipe.device)
    samples = [i for i, item in enumerate(items) if item.mode == "sample"]
    if samples:
        latents[samples] = pipe.sample_latents(len(samples), steps=settings.steps, sampler=settings.sampler,
                                               eta=settings.eta, seeds=[items[i].seed for i in samples],
                                               batch_size=len(samples), progress=False)
    clean = [i for i, item in enumerate(items) if item.mode == "reconstruct"]
    if clean:
        latents[clean] = pipe.encode([items[i].text for i in clean])
    for strength in sorted({item.strength for item in items if item.mode == "vary"}):
        group = [i for i, item in enumerate(items) if item.mode == "vary" and item.strength == strength]
        latents[group] = pipe.vary_latents([items[i].text for i in group], strength, settings.steps, settings.sampler,
                                           eta=settings.eta, seeds=[items[i].seed for i in group], progress=False)
    return pipe.decode(latents, num_beams=settings.num_beams, batch_size=max(1, len(items)), progress=False)


def pending_items(items: list[Item], output: Path, settings: JobSettings, resume: bool) -> list[Item]:
    """The items still to write to `output`: all of them for a new file, those not yet written for --resume."""
    if output.exists() and output.stat().st_size > 0 and not resume:
        raise FileExistsError(f"{output} already exists: pass --resume to continue it, or choose a new --output")
    done = done_keys(output, settings) if resume else set()
    return [item for item in items if item.key not in done]


def texts_fitting_memory(pipe, items: list[Item], settings: JobSettings, size: int) -> tuple[list[str], int]:
    """run_items in chunks of `size`, halved on out-of-memory (and logged) until they fit; returns the texts and
    the size that fit, for the next batch to start from."""
    texts, start = [], 0
    while start < len(items):
        chunk = items[start : start + size]
        try:
            texts += run_items(pipe, chunk, settings)
            start += len(chunk)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not is_out_of_memory(e) or size == 1:
                raise
            size = max(1, size // 2)
            log.warning("out of memory at a batch of %d items: retrying at %d", len(chunk), size)
            if pipe.device.type == "cuda":
                torch.cuda.empty_cache()
    return texts, size


def run_job(pipe, items: list[Item], output: str | Path, settings: JobSettings, *, batch_size: int = 64,
            resume: bool = False, progress: bool = True) -> dict:
    """Run `items` through `pipe`, appending their records to `output` in input order. Returns counts."""
    pipe.sampling(settings.sampler, settings.steps, settings.eta)  # settings that cannot run fail before any work
    output = Path(output)
    todo = pending_items(items, output, settings, resume)
    mark_truncated(pipe, todo)
    writer = OutputWriter(output)
    counts = {"written": 0, "errors": 0, "skipped": len(items) - len(todo)}
    bar = tqdm(total=len(todo), desc="generate", unit="item", disable=not progress, dynamic_ncols=True)
    try:
        size = batch_size
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            valid = [item for item in batch if item.error is None]
            texts, size = texts_fitting_memory(pipe, valid, settings, size)
            texts = iter(texts)
            writer.write([output_record(item, None if item.error else next(texts), settings) for item in batch])
            counts["written"] += len(valid)
            counts["errors"] += len(batch) - len(valid)
            bar.update(len(batch))
    finally:
        bar.close()
        writer.close()
    return counts


def mark_truncated(pipe, items: list[Item]) -> None:
    """Texts over the encoder's limit are truncated (as the API does, with a warning); their lines say so."""
    with_text = [item for item in items if item.error is None and item.text is not None]
    if not with_text:
        return
    tokenizer, limit = pipe.encoder.tokenizer, pipe.encoder.max_tokens
    lengths = token_lengths(tokenizer, [item.text for item in with_text])
    for item, n in zip(with_text, lengths):
        if n > limit:
            item.extra["truncated"] = True
            item.extra["warning"] = f"the text has {n} encoder tokens, over the limit of {limit}: its end was cut"
