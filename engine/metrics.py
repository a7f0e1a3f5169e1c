"""Text-quality measures used in the latent-diffusion literature (LD4LG, Lovelace et al. 2023).

Words are lower-cased whitespace tokens. Every function takes lists of strings and returns a float.
"""

from __future__ import annotations

import math
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


def exact_match(outputs: list[str], references: list[str]) -> float:
    return sum(o.strip() == r.strip() for o, r in zip(outputs, references)) / len(references) if references else 0.0


def corpus_bleu(outputs: list[str], references: list[str]) -> float:
    """Corpus BLEU (sacrebleu, its default 13a tokenizer), 0-100."""
    import sacrebleu

    return sacrebleu.corpus_bleu(outputs, [references]).score


def mauve_score(p_features, q_features, seed: int = 25) -> float:
    """MAUVE (Pillutla et al. 2021) between two sets of feature vectors (the `mauve-text` package)."""
    import mauve

    if min(len(p_features), len(q_features)) < 2:
        return math.nan
    return float(mauve.compute_mauve(p_features=p_features, q_features=q_features, verbose=False, seed=seed,
                                     device_id=-1).mauve)
