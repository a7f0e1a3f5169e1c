"""A freshly trained model checks itself before it is presented (`ldlm demo`): how much of held-out text its
latents bring back, and how many of its samples are broken (empty, one or two words, a word twice in a row,
mostly one repeated word). An undertrained model says so, and what to do, instead of offering gibberish as
the product.

Three verdicts. "undertrained": below what any usable model gives (the demo's `small` preset at 30 + 30 steps:
word overlap 0.09, 32 of 32 samples broken); "rough": usable, on-topic but loose (the demo's own 400 + 300
steps: 0.25, 6 of 32); "good": above both (bench/RESULTS.md, "the demo at fixed step counts").
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# (mean word-overlap F1 of held-out reconstructions, share of samples with a defect) that a verdict needs
MIN_RECONSTRUCTION_OVERLAP, MAX_BROKEN_SAMPLES = 0.15, 0.40  # below either: undertrained
GOOD_RECONSTRUCTION_OVERLAP, GOOD_BROKEN_SAMPLES = 0.40, 0.10  # both met: good; between: rough

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sample_defect(text: str) -> str | None:
    """Why a generated text is broken, or None: empty, under three words, a word twice in a row ("The the
    the."), or a text of six words or more whose distinct words are under half of them."""
    words = _words(text)
    if not words:
        return "empty"
    if len(words) < 3:
        return f"only {len(words)} word{'s' if len(words) > 1 else ''}"
    for a, b in zip(words, words[1:]):
        if a == b:
            return f"{a!r} twice in a row"
    if len(words) >= 6 and len(set(words)) < len(words) / 2:
        return "mostly repeated words"
    return None


def word_overlap(output: str, reference: str) -> float:
    """F1 of the two texts' words (lower-cased, punctuation dropped, counted with repeats)."""
    out, ref = Counter(_words(output)), Counter(_words(reference))
    common = sum((out & ref).values())
    if not common:
        return 0.0
    precision, recall = common / sum(out.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


@dataclass
class SelfCheck:
    reconstruction_overlap: float  # mean word_overlap of held-out texts and their reconstructions
    reconstructed: int  # held-out texts reconstructed
    broken: list[tuple[str, str]]  # (sample, its defect) for each broken sample
    sampled: int  # samples checked

    @property
    def broken_rate(self) -> float:
        return len(self.broken) / self.sampled if self.sampled else 0.0

    @property
    def verdict(self) -> str:
        """"undertrained", "rough" or "good" (see the module's docstring)."""
        overlap, broken = self.reconstruction_overlap, self.broken_rate
        if overlap < MIN_RECONSTRUCTION_OVERLAP or broken > MAX_BROKEN_SAMPLES:
            return "undertrained"
        return "good" if overlap >= GOOD_RECONSTRUCTION_OVERLAP and broken <= GOOD_BROKEN_SAMPLES else "rough"

    @property
    def passed(self) -> bool:
        return self.verdict != "undertrained"

    def summary(self) -> str:
        figures = (f"held-out reconstruction word overlap {self.reconstruction_overlap:.2f} over {self.reconstructed} "
                   f"texts; {len(self.broken)} of {self.sampled} samples broken")
        worst = "; ".join(f"{text!r} ({why})" for text, why in self.broken[:3])
        quoted = f". Broken samples: {worst}" if worst else ""
        if self.verdict == "good":
            return f"self-check: good ({figures})"
        if self.verdict == "rough":
            return (f"self-check: rough, usable but loose ({figures}; good needs >= {GOOD_RECONSTRUCTION_OVERLAP:.2f} "
                    f"and <= {GOOD_BROKEN_SAMPLES:.0%}){quoted}. More training steps make it fluent.")
        return (f"self-check FAILED, the model is undertrained ({figures}; a usable model has >= "
                f"{MIN_RECONSTRUCTION_OVERLAP:.2f} and <= {MAX_BROKEN_SAMPLES:.0%}){quoted}. What follows is not "
                "what a trained ldlm model writes.")


def check_model(pipe, held_out: list[str], samples: list[str], progress: bool = False) -> SelfCheck:
    """Reconstruct the held-out texts and look for broken samples."""
    reconstructions = pipe.reconstruct(held_out, progress=progress) if held_out else []
    overlaps = [word_overlap(r, t) for r, t in zip(reconstructions, held_out)]
    broken = [(s, why) for s in samples if (why := sample_defect(s)) is not None]
    return SelfCheck(reconstruction_overlap=sum(overlaps) / len(overlaps) if overlaps else 0.0,
                     reconstructed=len(held_out), broken=broken, sampled=len(samples))
