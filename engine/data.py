"""Training text: plain text (one example a line) or JSONL, and the demo corpus that ships with Python."""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path


def _fold(text: str) -> str:
    return " ".join(text.split())


def read_examples(path: str | Path, text_field: str = "text", condition_field: str | None = None
                  ) -> list[tuple[str, str | None]]:
    """(text, condition) per non-empty line; `.jsonl` lines are objects whose `text_field` holds the text and
    `condition_field` (if given: jsonl only) what it is generated from, a source text or a label (a string, or
    a number read as its name). Whitespace is folded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist")
    if condition_field is not None and path.suffix != ".jsonl":
        raise ValueError(f"{path}: a condition field ({condition_field!r}) needs .jsonl data, one object per line")
    examples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            condition = None
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno} is not valid JSON ({e}); fix or remove the line") from e
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path}:{lineno} has no string field {text_field!r}; pass --text-field")
                line = record[text_field].strip()
                if condition_field is not None:
                    value = record.get(condition_field)
                    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
                        raise ValueError(f"{path}:{lineno} has no usable field {condition_field!r} (a non-empty "
                                         f"string, got {value!r}); fix the line or pass another field")
                    condition = _fold(str(value))
            if line:
                examples.append((_fold(line), condition))
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
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_val = min(max_holdout, max(1 if len(texts) > 1 else 0, int(len(texts) * fraction)))
    return [texts[i] for i in order[n_val:]], [texts[i] for i in order[:n_val]]


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
