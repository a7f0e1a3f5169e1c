"""A batch job's input: JSONL lines parsed into items, each checked here for everything it could fail on later
(a bad line becomes its own error record, never the job's), and the unconditional items of `-n N`."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ldlm.inputs import MAX_SEED, check_strength, lone_surrogate, read_user_file
from ldlm.jobs.settings import JobOutputError
from ldlm.sampling.guidance import check_guidance

MODES = ("reconstruct", "vary")


FIELDS = ("id", "text", "mode", "strength", "seed", "source", "label", "guidance")  # what an input line may hold


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
