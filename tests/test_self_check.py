"""ldlm.evaluation.self_check on hand-made cases: broken samples, word overlap and the verdict."""

from __future__ import annotations

import pytest

from ldlm.evaluation.self_check import MIN_RECONSTRUCTION_OVERLAP, check_model, sample_defect, word_overlap


@pytest.mark.parametrize("text, defect", [
    ("", "empty"), ("  .. ", "empty"), ("Return.", "only 1 word"), ("The.", "only 1 word"),
    ("Return it.", "only 2 words"), ("The the the.", "'the' twice in a row"),
    ("Set the the window of this widget.", "'the' twice in a row"),
    ("a widget and a widget and a widget and a widget", "mostly repeated words"),
])
def test_broken_samples_are_named(text, defect):
    assert sample_defect(text) == defect


@pytest.mark.parametrize("text", ["Return a directory of a file.", "Set the window of this widget in the window.",
                                  "It's open daily.", "The value is 3 or 4."])
def test_sound_samples_pass(text):
    assert sample_defect(text) is None


def test_word_overlap():
    assert word_overlap("The cat sat.", "the cat sat") == 1.0
    assert word_overlap("dog", "the cat sat") == 0.0
    assert word_overlap("the cat", "the cat sat on it") == pytest.approx(2 * 1.0 * 0.4 / 1.4)
    assert word_overlap("", "") == 0.0


class _Echo:
    """A stand-in pipeline whose reconstructions are given."""

    def __init__(self, transform):
        self.transform = transform

    def reconstruct(self, texts, progress=False):
        return [self.transform(t) for t in texts]


def test_a_model_that_reconstructs_and_writes_sentences_is_good():
    check = check_model(_Echo(lambda t: t), ["Return the value.", "Open the file."], ["Read a line from it."] * 4)
    assert check.verdict == "good" and check.passed
    assert check.reconstruction_overlap == 1.0 and check.broken_rate == 0.0
    assert check.summary().startswith("self-check: good")


def test_a_loose_model_is_rough_but_usable():
    # a third of the words back (overlap 1/3 each), one sample in four broken: usable, not good
    check = check_model(_Echo(lambda t: t.split()[0] + " other words"), ["Return the value."] * 2,
                        ["Read a line.", "Open a file.", "Close it now.", "The the end."])
    assert check.verdict == "rough" and check.passed and "More training steps" in check.summary()


def test_bad_reconstructions_or_broken_samples_fail_and_are_quoted():
    poor = check_model(_Echo(lambda t: "A widget."), ["Return the value.", "Open the file."], ["Read a line."] * 4)
    assert poor.reconstruction_overlap < MIN_RECONSTRUCTION_OVERLAP and not poor.passed
    broken = check_model(_Echo(lambda t: t), ["Return the value."], ["The the the.", "Return.", "Read a line.", "Ok."])
    assert broken.broken_rate == 0.75 and not broken.passed
    assert "undertrained" in broken.summary() and "'The the the.'" in broken.summary()
