"""Batch generation jobs: JSONL in, JSONL out, in input order, crash-safe and resumable.

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

import dataclasses
import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm.auto import tqdm

from ldlm.model.encoder import token_lengths
from ldlm.sampling.guidance import check_condition, check_guidance
from ldlm.inputs import MAX_SEED, check_strength, lone_surrogate, read_user_file
from ldlm.model.model_files import folder_files
from ldlm.sampling.samplers import resolve_sampling

log = logging.getLogger("ldlm.jobs.batch")
MODES = ("reconstruct", "vary")
FIELDS = ("id", "text", "mode", "strength", "seed", "source", "label", "guidance")  # what an input line may hold


class JobOutputError(ValueError):
    """An output file a job cannot continue or write; the message names the file and what to do."""


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
    guidance: float | None = None  # lines with a source or label without their own; None: the checkpoint's

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def public(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def resolved_settings(settings: JobSettings, config) -> JobSettings:
    """The settings with the sampler and steps that will run (the checkpoint's defaults filled in, so the output
    records what ran); settings that cannot run fail here, before any work."""
    sampler, steps = resolve_sampling(config, settings.sampler, settings.steps, settings.eta)
    return dataclasses.replace(settings, sampler=sampler, steps=steps)


def model_fingerprint(path: str | Path) -> str:
    """A short hash of everything that decides a model's outputs: an export's manifest (the loader verifies
    every file of the export against the hashes it holds), or every file of a checkpoint but its training
    state (weights included: two checkpoints that differ in any weight differ here)."""
    from ldlm.export.manifest import MANIFEST, is_export

    path = Path(path)
    digest = hashlib.sha256()
    names = [MANIFEST] if is_export(path) else [n for n in folder_files(path) if n.split("/")[0] != "training"]
    for name in names:
        digest.update(name.encode() + b"\0")
        with (path / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
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
    source: str | None = None  # a conditional sample: the source text, or the label, it is generated from
    label: str | None = None
    guidance: float | None = None  # its own guidance weight; None: the job's
    request_hash: str = ""  # of what the line asks for: an edited line is a new request

    @property
    def ident(self) -> str:
        """The item's identity: its id, or its line when it has no usable id."""
        return f"id:{json.dumps(self.id)}" if self.id is not None and not self.duplicate else f"line:{self.line}"

    @property
    def key(self) -> str:
        """What `resume` recognizes a written item by: its identity and its request."""
        return f"{self.ident}#{self.request_hash}"


def derived_seed(job_seed: int, item_id: object) -> int:
    """A stable 31-bit seed from the job's seed and the id: it does not move when lines are added or removed."""
    return int(hashlib.sha256(f"{job_seed}:{json.dumps(item_id)}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _id_problem(record: dict) -> str | None:
    """Why the record's id cannot identify it, or None."""
    value = record.get("id")
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"got {value!r}" if "id" in record else "it has none"
    if isinstance(value, int) and abs(value) > MAX_SEED:
        return "an integer id must fit in 64 bits; write longer ids as strings"
    if isinstance(value, float) and not math.isfinite(value):
        return f"got {value!r}"
    if isinstance(value, str) and (not value.strip() or lone_surrogate(value) is not None):
        return "a string id must be non-empty text, without lone surrogate escapes"
    return None


def parse_line(raw: bytes, line: int, job_seed: int) -> Item:
    """One input line -> an Item (with `error` set when the line is bad, naming what to fix). Everything an item
    could fail on later (its seed's range, its text's encoding, its fields) is checked here."""
    item = Item(line, request_hash=_digest(raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        item.error = f"line {line} is not valid UTF-8 ({e.reason} at byte {e.start}): re-encode the file as UTF-8"
        return item
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        item.error = f"line {line} is not valid JSON ({e.msg} at column {e.colno}): write one JSON object per line"
        return item
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; arrays nested thousands deep
        item.error = f"line {line} cannot be read ({type(e).__name__}: {str(e)[:80]}): shorten its numbers and nesting"
        return item
    if not isinstance(record, dict):
        item.error = f"line {line} is a JSON {type(record).__name__}, not an object: write {{\"id\": ...}}"
        return item
    item.request_hash = _digest(json.dumps(record, sort_keys=True).encode())  # the request, not its spelling
    problem = _id_problem(record)
    if problem is not None:
        item.error = f"line {line} has no usable \"id\" (a string or number; {problem}): give each line a unique id"
        return item
    item.id = record["id"]
    item.error = _request_problem(item, record, job_seed)
    return item


def _request_problem(item: Item, record: dict, job_seed: int) -> str | None:
    """Fill `item` from the record; the first thing wrong with it, naming the id and the fix, or None."""
    name = f"id {item.id!r}"
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        return f"{name}: unknown field(s) {unknown}; a line holds only {list(FIELDS)} (check the spelling)"
    seed = record.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        return f"{name}: \"seed\" must be a whole number in [0, 2**63 - 1], got {seed!r}"
    item.seed = derived_seed(job_seed, item.id) if seed is None else seed
    if "source" in record or "label" in record or "guidance" in record:
        return _condition_problem(item, record)
    if "text" not in record:
        for key in ("mode", "strength"):
            if key in record:
                return f"{name}: {key} {record[key]!r} needs a \"text\"; drop the {key} for a sample"
        return None
    text, mode = record["text"], record.get("mode", "reconstruct")
    if not isinstance(text, str) or not text.strip():
        return f"{name}: \"text\" is empty or not a string: give a non-empty text, or drop it for a sample"
    position = lone_surrogate(text)
    if position is not None:
        return (f"{name}: \"text\" holds a lone surrogate ({text[position]!r} at character {position}), which is "
                "not text: fix the line's \\u escapes")
    if not isinstance(mode, str) or mode not in MODES:
        return f"{name}: unknown mode {mode!r}; use one of {list(MODES)}"
    if "strength" in record and mode != "vary":
        return f"{name}: \"strength\" applies to mode \"vary\" only; drop it, or set \"mode\": \"vary\""
    item.text, item.mode = text, mode
    if mode == "vary":
        try:
            check_strength(record.get("strength", 0.3))
        except ValueError as e:
            return f"{name}: {e}"
        item.strength = float(record.get("strength", 0.3))
    return None


def _condition_problem(item: Item, record: dict) -> str | None:
    """A conditional sample's fields (a `source` or a `label`, an optional `guidance`); the first thing wrong."""
    name = f"id {item.id!r}"
    if "text" in record or "mode" in record or "strength" in record:
        return f"{name}: a line generates from a \"source\" or \"label\", or works on a \"text\": not both"
    if ("source" in record) == ("label" in record):
        return f"{name}: \"guidance\" needs a \"source\" or a \"label\"" if "source" not in record else \
            f"{name}: give a \"source\" or a \"label\", not both"
    key = "source" if "source" in record else "label"
    value = record[key]
    if key == "source" and not isinstance(value, str):  # a number is no source text: 42 would run as "42"
        return f"{name}: \"source\" must be a text (a JSON string), got {value!r}: quote it if you mean the text"
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        return f"{name}: \"{key}\" must be a non-empty string{' or a number' * (key == 'label')}, got {value!r}"
    value = str(value)
    position = lone_surrogate(value)
    if position is not None:
        return f"{name}: \"{key}\" holds a lone surrogate at character {position}, which is not text: fix the escapes"
    guidance = record.get("guidance")
    if guidance is not None:
        try:
            check_guidance(guidance)
        except ValueError as e:
            return f"{name}: {e}"
        item.guidance = float(guidance)
    setattr(item, key, value)
    return None


def input_lines(source: bytes | BinaryIO | Iterable[bytes]) -> list[bytes]:
    """The lines of a JSONL input: bytes, a binary file, or its lines. A UTF-8 byte-order mark at the start is
    dropped, and CR, LF and CRLF each end a line (JSON strings hold no raw line breaks)."""
    if isinstance(source, (bytes, bytearray)):
        lines = bytes(source).splitlines()
    elif hasattr(source, "read"):
        lines = source.read().splitlines()
    else:  # one line per entry, each perhaps with its ending
        lines = [part for chunk in source for part in (chunk.splitlines() or [b""])]
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    return lines


def read_items(source: bytes | BinaryIO | Iterable[bytes], job_seed: int) -> list[Item]:
    """Parse every line (blank lines skipped) and mark duplicate ids, naming the first line that used them."""
    items, first_line = [], {}
    for number, raw in enumerate(input_lines(source), start=1):
        if not raw.strip():
            continue
        item = parse_line(raw, number, job_seed)
        if item.id is not None and item.error is None:
            key = json.dumps(item.id)
            if key in first_line:
                item.duplicate = True
                item.error = f"duplicate id {item.id!r} on line {number} (first on line {first_line[key]}): ids must be unique"
            else:
                first_line[key] = number
        items.append(item)
    return items


def read_input_file(path: str | Path, job_seed: int, output: str | Path | None = None) -> list[Item]:
    """read_items of a file, with errors that name it; `output`, if given, must be another file."""
    path = Path(path)
    if output is not None and Path(output).exists() and path.exists() and os.path.samefile(path, output):
        raise JobOutputError(f"--output {output} is the --input file: a job never writes over its input; pass "
                             "another --output")
    return read_items(read_user_file(path, "--input", "a JSONL file"), job_seed)


def unconditional_items(n: int, job_seed: int) -> Iterator[Item]:
    """`--num-samples N` without an input file: ids 0 .. N-1, made one at a time as the job reaches them."""
    return (Item(i + 1, id=i, seed=derived_seed(job_seed, i), request_hash=_digest(json.dumps({"id": i}).encode()))
            for i in range(n))


def output_record(item: Item, text: str | None, settings: JobSettings) -> dict:
    record = {"id": item.id} if item.id is not None else {"line": item.line}
    if item.error is not None:
        return {**record, "error": item.error, "settings_hash": settings.hash(), "key": item.key}
    record.update({"text": text, "mode": item.mode, "seed": item.seed})
    if item.text is not None:
        record["input"] = item.text
    for key in ("source", "label", "guidance"):
        if getattr(item, key) is not None:
            record[key] = getattr(item, key)
    if item.strength is not None:
        record["strength"] = item.strength
    record.update(item.extra)
    return {**record, "settings": settings.public(), "settings_hash": settings.hash(), "key": item.key}


def _job_record(raw: bytes) -> dict | None:
    """A line of a job's output as its record, or None if ldlm did not write it."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or not ("id" in record or "line" in record):
        return None
    if not isinstance(record.get("settings_hash"), str) or not isinstance(record.get("key"), str):
        return None
    return record


def _json_line(record: dict) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # text that UTF-8 cannot hold: escaped, still valid JSON
        return (json.dumps(record) + "\n").encode("ascii")


class JobOutput:
    """A job's output file, held for the whole job: locked against other jobs, checked (and, after a crash, its
    torn last record cut) before anything is written, then appended to batch by batch, each batch flushed and
    fsync'ed before `write` returns. `done` holds the keys already written, `done_idents` their identities."""

    def __init__(self, path: str | Path, settings: JobSettings, resume: bool):
        self.path, self.settings, self.written = Path(path), settings, 0
        if self.path.is_dir():
            raise JobOutputError(f"--output {self.path} is a directory: pass a file")
        if self.path.exists() and not self.path.is_file():  # a device or pipe: nothing a job can resume or own
            raise JobOutputError(f"--output {self.path} is not a regular file: pass a file")
        blocking = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise JobOutputError(f"--output {self.path} cannot be created: {blocking} is a file, not a folder")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a+b")
        except OSError as e:
            raise JobOutputError(f"--output {self.path} cannot be opened for writing ({e.strerror})") from None
        try:
            self._lock()
            self.done, self.done_idents = self._read(resume)
        except BaseException:
            self.file.close()
            raise

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobOutputError(f"{self.path} is being written by another job (it holds the file's lock): wait for "
                                 "that job to end, or pass another --output") from None

    def _read(self, resume: bool) -> tuple[set[str], set[str]]:
        self.file.seek(0)
        data = self.file.read()
        if not data:
            return set(), set()
        if not resume:
            raise FileExistsError(f"{self.path} already exists: pass --resume to continue it, or choose a new --output")
        complete, _, tail = data.rpartition(b"\n")
        records = []
        for number, raw in enumerate(complete.split(b"\n") if complete or data.startswith(b"\n") else [], 1):
            records.append(self._record(raw, number))
        if tail:
            record = _job_record(tail)
            if record is not None:  # whole, cut just before its newline
                records.append(self._record(tail, len(records) + 1))
                self._append(b"\n")
            elif tail.startswith((b'{"id": ', b'{"line": ')):  # a record torn by a crash mid-write
                self.file.truncate(len(data) - len(tail))
                log.warning("%s ended in a partial record (an interrupted write): removed it; that item runs again",
                            self.path)
            else:
                raise JobOutputError(f"{self.path} ends in a line ldlm did not write ({tail[:60]!r}): --resume "
                                     "continues only a job's own output, and the file was left as it is; pass "
                                     "another --output")
        return {r["key"] for r in records}, {r["key"].split("#")[0] for r in records}

    def _record(self, raw: bytes, number: int) -> dict:
        record = _job_record(raw)
        if record is None:
            raise JobOutputError(f"{self.path} line {number} is not a record of an ldlm job ({raw[:60]!r}): --resume "
                                 "continues only a job's own output, and the file was left as it is; pass another "
                                 "--output")
        if record["settings_hash"] != self.settings.hash() and record.get("settings") == self.settings.public():
            raise ValueError(f"{self.path} line {number} was written by another model (its fingerprint differs from "
                             f"{self.settings.model}: other weights or files): resume with the model that wrote it, "
                             "or write to a new --output")
        if record["settings_hash"] != self.settings.hash():
            raise ValueError(f"{self.path} line {number} was written with other settings ({record.get('settings')}); "
                             f"this run has {self.settings.public()} on model {self.settings.model}: resume with the "
                             "same settings and model, or write to a new --output")
        if "#" not in record["key"]:
            raise JobOutputError(f"{self.path} was written by an earlier ldlm, whose records do not say what each "
                                 "line asked for: resume it with that version, or pass a new --output")
        return record

    def _append(self, data: bytes) -> None:
        try:
            self.file.write(data)
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as e:
            raise JobOutputError(f"writing {self.path} failed ({e.strerror}): the {self.written} records written "
                                 "before are kept; make room or fix the permissions, then run again with "
                                 "--resume") from e

    def write(self, records: list[dict]) -> None:
        if records:
            self._append(b"".join(_json_line(r) for r in records))
            self.written += len(records)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> JobOutput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pending(self, items: list[Item]) -> list[Item]:
        """The items not yet written, all at once (the Ray driver plans its dataset up front)."""
        return [item for batch in self.pending_batches(items, max(1, len(items)), lambda _: None) for item in batch]

    def pending_batches(self, items: Iterable[Item], size: int, skipped: Callable[[int], None]
                        ) -> Iterator[list[Item]]:
        """The items not yet written, `size` at a time, read from `items` as they are needed (a job of any length
        holds one batch); skipped(k) hears of each run of items already written. Says at the end how many were
        edited since they were written."""
        batch, edited, first = [], 0, None
        for item in items:
            if item.key in self.done:
                skipped(1)
                continue
            if item.ident in self.done_idents:
                edited, first = edited + 1, first or item.ident
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch
        if edited:
            log.warning("%d lines of the input changed since %s was written (first: %s): they ran again, and their "
                        "new records follow the old ones (an id's last record is its current one)", edited,
                        self.path, first)


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
                                               batch_size=len(samples), progress=False)
    conditional = [i for i, item in enumerate(items) if _conditional(item)]
    for guidance in dict.fromkeys(_guidance(items[i], settings) for i in conditional):  # in order of appearance
        group = [i for i in conditional if _guidance(items[i], settings) == guidance]
        kind = "sources" if items[group[0]].source is not None else "labels"
        given = [items[i].source if kind == "sources" else items[i].label for i in group]
        latents[group] = pipe.sample_latents(len(group), steps=settings.steps, sampler=settings.sampler,
                                             eta=settings.eta, seeds=[items[i].seed for i in group],
                                             batch_size=len(group), guidance=guidance, progress=False,
                                             **{kind: given})
    clean = [i for i, item in enumerate(items) if item.mode == "reconstruct"]
    if clean:
        latents[clean] = pipe.encode([items[i].text for i in clean])
    for strength in sorted({item.strength for item in items if item.mode == "vary"}):
        group = [i for i, item in enumerate(items) if item.mode == "vary" and item.strength == strength]
        latents[group] = pipe.vary_latents([items[i].text for i in group], strength, settings.steps, settings.sampler,
                                           eta=settings.eta, seeds=[items[i].seed for i in group], progress=False)
    return pipe.decode(latents, num_beams=settings.num_beams, batch_size=max(1, len(items)), progress=False)


def _conditional(item: Item) -> bool:
    return item.source is not None or item.label is not None


def _guidance(item: Item, settings: JobSettings) -> float | None:
    return item.guidance if item.guidance is not None else settings.guidance


def mark_bad_conditions(config, items: list[Item]) -> None:
    """Conditional lines checked against the model before any work (ldlm.sampling.guidance.check_condition): an
    unconditional model, the wrong kind or an unknown label is that line's error."""
    for item in items:
        if item.error is None and _conditional(item):
            try:
                check_condition(config, 1, [item.source] if item.source is not None else None,
                                [item.label] if item.label is not None else None)
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
            mark_bad_conditions(pipe.config, batch)
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
