"""Reading training data, the held-out split, and the demo corpus that ships with Python."""

from __future__ import annotations

import tracemalloc

import pytest

from ldlm.training.data import (MAX_LINE_BYTES, MAX_TEXT_CHARS, holdout_indices, python_docs_corpus,
                                read_conditional_corpus, read_corpus, read_texts, split_holdout)


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


def test_holding_out_by_group_keeps_each_group_on_one_side():
    groups = [f"mr{i % 37}" for i in range(1000)]  # 37 groups of 27-28 lines
    train, val = holdout_indices(1000, 0.1, seed=3, groups=groups)
    assert sorted(train + val) == list(range(1000))
    assert not {groups[i] for i in train} & {groups[i] for i in val}
    assert 100 - 28 < len(val) <= 100  # whole groups up to the share
    assert holdout_indices(1000, 0.1, seed=3, groups=groups) == (train, val)
    assert holdout_indices(1000, 0.1, seed=4, groups=groups)[1] != val
    # a group larger than the share is held out alone; the last group always trains
    two = ["a"] * 5 + ["b"]
    for seed in range(4):
        train, val = holdout_indices(6, 0.02, seed=seed, groups=two)
        assert train and val and len({two[i] for i in train}) == len({two[i] for i in val}) == 1
    with pytest.raises(ValueError, match="at least 2 distinct groups"):
        holdout_indices(4, 0.5, groups=["a"] * 4)


def test_python_docs_corpus():
    corpus = python_docs_corpus(limit=500)
    assert len(corpus) == 500 and corpus == python_docs_corpus(limit=500)
    assert all(s[0].isupper() and s.endswith(".") and 6 <= len(s.split()) <= 24 for s in corpus)


def test_a_huge_line_is_read_in_bounded_memory_and_cut_with_a_warning(tmp_path):
    """A 20 MB line (issue 37: one such line took 10-21 GB in training) costs a few MAX_LINE_BYTES to read."""
    path = tmp_path / "huge.txt"
    with path.open("w") as f:
        f.write("before\n" + "word " * 4_000_000 + "\nafter\n")
    tracemalloc.start()
    try:
        with pytest.warns(UserWarning, match=r"huge.txt: 1 line\(s\) held more than 20000 characters.*line 2$"):
            texts = read_texts(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert texts[0] == "before" and texts[2] == "after" and len(texts) == 3
    assert len(texts[1]) <= MAX_TEXT_CHARS and texts[1].startswith("word word")
    assert peak < 8 * MAX_LINE_BYTES, f"reading took {peak / 2**20:.1f} MiB at its peak"


def test_jsonl_lines_too_long_or_too_deep_are_errors_naming_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "' + "x" * (MAX_LINE_BYTES + 10) + '"}\n')
    with pytest.raises(ValueError, match=rf"data.jsonl:2 is longer than {MAX_LINE_BYTES} bytes"):
        read_texts(path)
    path.write_text('{"text": "ok"}\n' + '{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ValueError, match=r"data.jsonl:2 is JSON nested too deeply"):
        read_texts(path)
    path.write_text('{"text": "ok", "mr": "' + "m" * (MAX_TEXT_CHARS + 5) + '"}\n')
    with pytest.warns(UserWarning, match="line 1$"):
        texts, sources = read_conditional_corpus([path], "text", "mr")
    assert texts == ["ok"] and len(sources[0]) == MAX_TEXT_CHARS


def test_a_directory_or_a_file_not_in_utf8_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory: pass the files in it"):
        read_texts(tmp_path)
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine\ncaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt:2 is not UTF-8 text .*iconv"):
        read_texts(path)
    path.write_bytes(b"\xef\xbb\xbfwith a byte-order mark\n")
    assert read_texts(path) == ["with a byte-order mark"]
