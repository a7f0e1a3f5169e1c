"""Training text: plain text (one example a line) or JSONL, and the demo corpus that ships with Python."""

from __future__ import annotations

import ast
import codecs
import itertools
import json
import random
import re
import sysconfig
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


def _fold(text: str) -> str:
    return " ".join(text.split())


MAX_LINE_BYTES = 1 << 20  # of one training line, the most read: the models keep a few hundred tokens of it
MAX_TEXT_CHARS = 20_000  # of one text or condition, the most kept (the encoder's limit is far lower)


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, the line's first MAX_LINE_BYTES bytes, whether it held more), holding no more than that
    in memory however long a line is."""
    with path.open("rb") as f:
        for lineno in itertools.count(1):
            line = f.readline(MAX_LINE_BYTES + 1)
            if not line:
                return
            longer = len(line) > MAX_LINE_BYTES and not line.endswith(b"\n")
            if longer:  # skip the rest of the line, a block at a time
                while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                    pass
            yield lineno, line[:MAX_LINE_BYTES], longer


def _decode(raw: bytes, where: str, cut: bool) -> str:
    try:  # a line cut mid-character keeps the whole characters before the cut
        return codecs.getincrementaldecoder("utf-8")().decode(raw, final=not cut)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start} of the line): convert the file "
                         "to UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE) or remove the line") from None


def read_examples(path: str | Path, text_field: str = "text", condition_field: str | None = None
                  ) -> list[tuple[str, str | None]]:
    """(text, condition) per non-empty line; `.jsonl` lines are objects whose `text_field` holds the text and
    `condition_field` (if given: jsonl only) what it is generated from, a source text or a label (a string, or
    a number read as its name). Whitespace is folded.

    Bounded whatever the file holds: a plain-text line is read up to MAX_LINE_BYTES and each text and condition
    kept up to MAX_TEXT_CHARS characters (the models read far fewer tokens), with one warning naming the lines
    cut; a JSONL line longer than MAX_LINE_BYTES, or nested too deeply to parse, is an error naming it."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"training data {path} is a directory: pass the files in it (e.g. {path}/*.txt)")
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist")
    if condition_field is not None and path.suffix != ".jsonl":
        raise ValueError(f"{path}: a condition field ({condition_field!r}) needs .jsonl data, one object per line")
    examples, cut_lines = [], []
    for lineno, raw, longer in _lines(path):
        where = f"{path}:{lineno}"
        if longer and path.suffix == ".jsonl":
            raise ValueError(f"{where} is longer than {MAX_LINE_BYTES} bytes, the most ldlm reads of a training "
                             "line (the models keep a few hundred tokens of a text): shorten or remove the line")
        line = _decode(raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw, where, longer).strip()
        if not line:
            continue
        condition = None
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not valid JSON ({e}); fix or remove the line") from e
            except RecursionError:
                raise ValueError(f"{where} is JSON nested too deeply to read; a training line is an object with "
                                 f"a {text_field!r} string: fix or remove the line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{where} has no string field {text_field!r}; pass --text-field")
            line = record[text_field].strip()
            if condition_field is not None:
                value = record.get(condition_field)
                if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
                    raise ValueError(f"{where} has no usable field {condition_field!r} (a non-empty "
                                     f"string, got {value!r}); fix the line or pass another field")
                condition = _fold(str(value)[:MAX_TEXT_CHARS])
                longer = longer or len(str(value)) > MAX_TEXT_CHARS
        if longer or len(line) > MAX_TEXT_CHARS:
            cut_lines.append(lineno)
        if line:
            examples.append((_fold(line[:MAX_TEXT_CHARS]), condition))
    if cut_lines:
        shown = ", ".join(map(str, cut_lines[:5])) + (f" and {len(cut_lines) - 5} more" if len(cut_lines) > 5 else "")
        warnings.warn(f"{path}: {len(cut_lines)} line(s) held more than {MAX_TEXT_CHARS} characters (or "
                      f"{MAX_LINE_BYTES} bytes) of text; each was cut to that, of which the models read the first "
                      f"few hundred tokens: line {shown}", stacklevel=2)
    return examples


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """One example per non-empty line; `.jsonl` lines are objects whose `text_field` holds the text."""
    return [text for text, _ in read_examples(path, text_field)]


def read_corpus(paths: list[str | Path], text_field: str = "text") -> list[str]:
    texts = [t for p in paths for t in read_texts(p, text_field)]
    if not texts:
        raise ValueError(f"no text found in {[str(p) for p in paths]}")
    return texts


def read_conditional_corpus(paths: list[str | Path], text_field: str, condition_field: str
                            ) -> tuple[list[str], list[str]]:
    """The texts and, aligned with them, what each is generated from (ldlm train --source-field/--label-field)."""
    examples = [e for p in paths for e in read_examples(p, text_field, condition_field)]
    if not examples:
        raise ValueError(f"no text found in {[str(p) for p in paths]}")
    return [text for text, _ in examples], [condition for _, condition in examples]


def split_holdout(texts: list[str], fraction: float = 0.02, max_holdout: int = 500, seed: int = 0):
    """Shuffle deterministically and hold out a validation slice (at least 1 item when there are 2 or more)."""
    train, val = holdout_indices(len(texts), fraction, max_holdout, seed)
    return [texts[i] for i in train], [texts[i] for i in val]


def holdout_indices(n: int, fraction: float = 0.02, max_holdout: int = 500, seed: int = 0,
                    groups: list[str] | None = None) -> tuple[list[int], list[int]]:
    """Indices (train, held out) of n examples in a deterministic shuffle: about `fraction` of them held out, at
    most max_holdout, at least 1 when there are 2 or more. With `groups` (one key per example, e.g. its source
    text), whole groups are held out in turn until the share is reached, so that the held-out loss measures
    keys the model never trained on; at least one group stays on each side."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(max_holdout, max(1 if n > 1 else 0, int(n * fraction)))
    if groups is None:
        return order[n_val:], order[:n_val]
    if len(groups) != n:
        raise ValueError(f"holdout_indices: {len(groups)} group keys for {n} examples")
    keys = list(dict.fromkeys(groups[i] for i in order))  # in shuffled order: the first ones are held out
    if len(keys) < 2:
        raise ValueError(f"holding out by group needs at least 2 distinct groups, got {len(keys)}: hold out by "
                         "line instead")
    sizes = Counter(groups)
    held, count = set(), 0
    for key in keys[:-1]:  # the last one always trains
        if held and count + sizes[key] > n_val:
            break
        held.add(key)
        count += sizes[key]
    return [i for i in order if groups[i] not in held], [i for i in order if groups[i] in held]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r"[{}\[\]=<>|*\\`#@$~^]|::|>>>|\.\.\.|\(\)|__")


def _sentences(text: str, min_words: int, max_words: int):
    for paragraph in re.split(r"\n\s*\n", text):
        for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
            words = sentence.split()
            if (min_words <= len(words) <= max_words and sentence[0].isupper() and sentence.endswith(".")
                    and sentence.isascii() and not _CODE_LIKE.search(sentence)):
                yield sentence


def python_docs_corpus(limit: int = 8000, min_words: int = 6, max_words: int = 24) -> list[str]:
    """English sentences from the documentation inside this Python: the help topics (pydoc_data) and the
    docstrings of the standard library's modules, read with `ast` (nothing imported). Deterministic."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/__init__.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        docs += [ast.get_docstring(node) or "" for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))]
    seen, corpus = set(), []
    for doc in docs:
        for sentence in _sentences(doc, min_words, max_words):
            if sentence not in seen:
                seen.add(sentence)
                corpus.append(sentence)
    random.Random(0).shuffle(corpus)
    return corpus[:limit]
