"""Quality measures on hand-checked inputs, and `ldlm eval` end to end on the tiny preset."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from ldlm.cli import main
from ldlm.evaluation import metrics
from ldlm.evaluation.evaluate import EvalSettings, evaluate, format_table
from ldlm.model.encoder import build_tiny_encoder

from .conftest import TINY_TEXTS


def test_diversity():
    assert metrics.diversity(["a b c d e"]) == 1.0
    # "a b a b a b": bigrams 5 (2 unique), trigrams 4 (2 unique), 4-grams 3 (2 unique)
    assert metrics.diversity(["a b a b a b"]) == pytest.approx((2 / 5) * (2 / 4) * (2 / 3))
    assert metrics.diversity(["too short"]) == 0.0


def test_memorization():
    train = ["the cat sat on the mat today"]
    assert metrics.memorization(["the cat sat on the mat"], train) == 1.0
    assert metrics.memorization(["a dog sat on the mat"], train) == pytest.approx(1 / 3)  # only "sat on the mat"
    assert metrics.memorization(["x y"], train) == 0.0


def test_length_degenerate_exact_match():
    assert metrics.mean_length(["a b", "c d e f"]) == 3.0
    assert metrics.is_degenerate("") and metrics.is_degenerate("   ")
    assert metrics.is_degenerate("go go go go go go go go go go")
    assert not metrics.is_degenerate("a perfectly normal sentence about a cat on a mat")
    assert metrics.degenerate_rate(["", "fine text here"]) == 0.5
    assert metrics.exact_match(["a", "b "], ["a", "c"]) == 0.5


def test_bleu_and_mauve_bounds():
    assert metrics.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    rng = np.random.default_rng(0)
    same = metrics.mauve_score(rng.normal(size=(60, 8)), rng.normal(size=(60, 8)))
    apart = metrics.mauve_score(rng.normal(size=(60, 8)), rng.normal(size=(60, 8)) + 5.0)
    assert 0 < apart < same <= 1


def test_evaluate_tiny_pipeline(tiny_pipeline):
    encoder = build_tiny_encoder(32)
    samples = ["a cat.", "", "b dog sat.", "the sun sets.", "we ate pizza.", "rain fell."]
    result = evaluate(TINY_TEXTS[:16], TINY_TEXTS, pipe=tiny_pipeline, samples=samples,
                      settings=EvalSettings(num_samples=6, sampler="ddim", steps=5), feature_encoder=encoder,
                      progress=False)
    rows = result["rows"]
    assert set(rows) == {"model", "samples", "reference"} and result["n"] == 6
    assert rows["model"]["samples"]["n"] == rows["samples"]["samples"]["n"] == rows["reference"]["samples"]["n"] == 6
    assert rows["samples"]["samples"]["degenerate"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="--samples has 2 texts; give at least 6"):
        evaluate(TINY_TEXTS[:16], TINY_TEXTS, samples=samples[:2], settings=EvalSettings(num_samples=6),
                 feature_encoder=encoder)
    assert 0 <= rows["model"]["reconstruction"]["token_accuracy"] <= 1
    assert rows["reference"]["samples"]["mem"] == 1.0  # the references are the training texts here
    assert "| model |" in format_table(result)

    samples_only = evaluate(TINY_TEXTS[:16], TINY_TEXTS, pipe=tiny_pipeline,
                            settings=EvalSettings(num_samples=6, sampler="ddim", steps=5, reconstruction=False),
                            feature_encoder=encoder, progress=False)["rows"]["model"]
    assert "reconstruction" not in samples_only and samples_only["samples"] == rows["model"]["samples"]
    assert samples_only["examples"] == rows["model"]["examples"]  # the same seed draws the same samples


def test_eval_cli_scores_a_sample_file(tmp_path, capsys):
    refs, train, samples = tmp_path / "refs.txt", tmp_path / "train.txt", tmp_path / "samples.txt"
    refs.write_text("\n".join(TINY_TEXTS[:6]))
    train.write_text("\n".join(TINY_TEXTS))
    samples.write_text("the cat sat on the mat.\na dog ran.\nrain fell on the town.\n")
    code = main(["eval", "--references", str(refs), "--train", str(train), "--samples", str(samples),
                 "--output", str(tmp_path / "out.json"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "| samples |" in out and "| reference |" in out
    assert json.loads((tmp_path / "out.json").read_text())["rows"]["samples"]["samples"]["n"] == 3


def test_a_missing_optional_package_is_a_one_line_error_naming_its_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wordfreq", None)  # `import wordfreq` now fails as if it were not installed
    refs, samples = tmp_path / "refs.txt", tmp_path / "samples.txt"
    refs.write_text("\n".join(TINY_TEXTS[:6]))
    samples.write_text("the cat sat on the mat.\na dog ran.\nrain fell on the town.\n")
    code = main(["eval", "--references", str(refs), "--train", str(refs), "--samples", str(samples), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "this needs wordfreq" in err and "pip install 'ldlm[eval]'" in err
    assert "Traceback" not in err


def test_rouge_l_against_hand_computed_values():
    # LCS of "the cat sat on the mat" and "the cat is on a mat": the cat on mat = 4 of 6 and 6 words
    p = r = 4 / 6
    expected = 100 * (1 + 1.2**2) * p * r / (r + 1.2**2 * p)
    assert metrics.rouge_l(["the cat sat on the mat"], [["the cat is on a mat"]]) == pytest.approx(expected)
    assert metrics.rouge_l(["The cat."], [["a dog", "the cat ."]]) == pytest.approx(100.0)  # the best reference
    assert metrics.rouge_l(["x y z"], [["a b"]]) == 0.0
    assert metrics.rouge_l(["", "a b"], [["a"], ["a b"]]) == pytest.approx(50.0)


def test_multi_reference_bleu_takes_every_reference():
    outputs = ["the cat sat on the mat", "a dog ran in the park"]
    one = metrics.multi_reference_bleu(outputs, [["the cat is on the mat"], ["a dog ran in a park"]])
    more = metrics.multi_reference_bleu(outputs, [["the cat is on the mat", "the cat sat on the mat"],
                                                  ["a dog ran in a park"]])
    assert more > one and metrics.multi_reference_bleu(outputs, [[o] for o in outputs]) == pytest.approx(100.0)


def test_unknown_word_rate_counts_invented_words():
    assert metrics.unknown_word_rate(["The cat sat on the mat."]) == 0.0
    # two invented words among eight; a price and a number are not words
    assert metrics.unknown_word_rate(["The nailicicate cat sat on antrucrifals mats, £20 for 3."]) == \
        pytest.approx(2 / 8)
    assert metrics.unknown_word_rate(["", "42 !"]) == 0.0
