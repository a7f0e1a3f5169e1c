"""Reading training data, the held-out split, and the demo corpus that ships with Python."""

from __future__ import annotations

import pytest

from ldlm.data import python_docs_corpus, read_corpus, read_texts, split_holdout


def test_plain_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first  line\n\n second line \n")
    (tmp_path / "b.jsonl").write_text('{"text": "from json"}\n{"body": "x", "text": " spaced  out "}\n')
    assert read_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == ["first line", "second line", "from json",
                                                                        "spaced out"]


def test_bad_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not valid JSON"):
        read_texts(path)
    path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no string field 'text'"):
        read_texts(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text found"):
        read_corpus([tmp_path / "empty.txt"])


def test_split_holdout_is_deterministic_and_disjoint():
    texts = [f"t{i}" for i in range(1000)]
    train, val = split_holdout(texts, 0.02, seed=0)
    assert len(val) == 20 and len(train) == 980 and not set(train) & set(val)
    assert split_holdout(texts, 0.02, seed=0) == (train, val)
    assert split_holdout(["a", "b"], 0.02)[1] != []


def test_python_docs_corpus():
    corpus = python_docs_corpus(limit=500)
    assert len(corpus) == 500 and corpus == python_docs_corpus(limit=500)
    assert all(s[0].isupper() and s.endswith(".") and 6 <= len(s.split()) <= 24 for s in corpus)
