"""Text-quality measures used in the latent-diffusion literature (LD4LG, Lovelace et al. 2023).

Words are lower-cased whitespace tokens. Every function takes lists of strings and returns a float.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable


def words(text: str) -> list[str]:
    return text.lower().split()


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def diversity(texts: list[str], orders: Iterable[int] = (2, 3, 4)) -> float:
    """Div: the product over n of (unique n-grams / total n-grams) across all texts; 0 when there are none."""
    result = 1.0
    for n in orders:
        grams = [g for t in texts for g in ngrams(words(t), n)]
        if not grams:
            return 0.0
        result *= len(set(grams)) / len(grams)
    return result


def memorization(texts: list[str], train_texts: list[str], n: int = 4) -> float:
    """Mem: the share of generated n-grams (with repeats) that occur anywhere in the training texts."""
    seen = {g for t in train_texts for g in ngrams(words(t), n)}
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return sum(g in seen for g in grams) / len(grams) if grams else 0.0


def mean_length(texts: list[str]) -> float:
    return sum(len(words(t)) for t in texts) / len(texts) if texts else 0.0


def is_degenerate(text: str, min_words: int = 8, max_repeat_share: float = 0.5) -> bool:
    """Empty, or a text of at least `min_words` words whose 4-grams are mostly repeats of each other."""
    tokens = words(text)
    if not tokens:
        return True
    grams = ngrams(tokens, 4)
    return len(tokens) >= min_words and bool(grams) and 1 - len(set(grams)) / len(grams) > max_repeat_share


def degenerate_rate(texts: list[str]) -> float:
    return sum(map(is_degenerate, texts)) / len(texts) if texts else 0.0


def unknown_word_rate(texts: list[str], lang: str = "en") -> float:
    """The share of words (with repeats) that the `wordfreq` lists have never seen: invented words such as
    "nailicicate" score 1, real ones 0. It depends on no model here, so it sees what features cannot.
    Tokens without a letter (numbers, prices) are left out; a text of none gives 0."""
    import wordfreq

    tokens = [w for t in texts for w in wordfreq.tokenize(t, lang) if any(c.isalpha() for c in w)]
    return sum(wordfreq.zipf_frequency(w, lang) == 0 for w in tokens) / len(tokens) if tokens else 0.0


def exact_match(outputs: list[str], references: list[str]) -> float:
    return sum(o.strip() == r.strip() for o, r in zip(outputs, references)) / len(references) if references else 0.0


def corpus_bleu(outputs: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, its default 13a tokenizer), 0-100."""
    import sacrebleu

    return sacrebleu.corpus_bleu(outputs, [references]).score


def multi_reference_bleu(outputs: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU with every reference of each output (E2E scores a description against all of its MR's):
    references[i] holds output i's references, any number of them. 0-100."""
    import sacrebleu

    streams = max(map(len, references), default=0)
    padded = [[refs[k] if k < len(refs) else None for refs in references] for k in range(streams)]
    return sacrebleu.corpus_bleu(outputs, padded).score


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        previous = 0  # row[j - 1] of the row before
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], previous + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(outputs: list[str], references: list[list[str]], beta: float = 1.2) -> float:
    """ROUGE-L (Lin 2004) as the E2E challenge's scripts compute it (pycocoevalcap): per output, the longest
    common subsequence's precision and recall, each the best over its references, combined as an F-measure
    weighting recall by beta; the mean over outputs, 0-100. Words are lower-cased, punctuation split off."""
    def tokens(text: str) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text.lower())

    scores = []
    for output, refs in zip(outputs, references, strict=True):
        out = tokens(output)
        if not out or not refs:
            scores.append(0.0)
            continue
        lcs = [(_lcs(out, ref), len(ref)) for ref in map(tokens, refs)]
        precision = max(n / len(out) for n, _ in lcs)
        recall = max(n / length for n, length in lcs if length)
        scores.append(0.0 if precision == 0 or recall == 0 else
                      (1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return 100 * sum(scores) / len(scores) if scores else 0.0


def mauve_score(p_features, q_features, seed: int = 25) -> float:
    """MAUVE (Pillutla et al. 2021) between two sets of feature vectors (the `mauve-text` package)."""
    import mauve

    if min(len(p_features), len(q_features)) < 2:
        return math.nan
    return float(mauve.compute_mauve(p_features=p_features, q_features=q_features, verbose=False, seed=seed,
                                     device_id=-1).mauve)
