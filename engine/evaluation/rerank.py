"""Candidate reranking: several texts sampled for one source, one kept.

- "mbr": minimum Bayes risk decoding (Kumar and Byrne 2004; LD4LG reranks its samples so): the candidate that
  agrees most with the others, agreement being smoothed sentence BLEU (Lin and Och 2004, add-one above unigrams)
  summed over the other candidates. Needs nothing but the texts.
- "slots": for E2E meaning representations (`name : X | food : Y | ...`), the candidate with the fewest slot
  errors against its source (ldlm.evaluation.slot_error, omitted or contradicted values), ties broken by MBR, as
  TGen reranks its beam by a classifier of the source's slots.

Ties keep the earlier candidate, so the first one (drawn from the item's own seed) wins when all agree.
Candidate j of an item whose seed is s draws its noise from `candidate_seed(s, j)`: s itself for j = 0, so one
candidate is the text the call with that item's seed gives.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter

from ldlm.evaluation.slot_error import parse_mr, slot_errors
from ldlm.inputs import MAX_SEED, check_seed

RERANKERS = ("mbr", "slots")
MAX_CANDIDATES = 64  # per item: each costs a forward row per step and a decode


def check_reranking(candidates, rerank: str, sources: list[str] | None, *, name: str = "sources[{i}]") -> None:
    """Raise naming the fix for a candidate count out of bounds, an unknown reranker, or "slots" on sources that
    are not E2E meaning representations; `name` formats a source's name in the message from its index i."""
    if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
        raise ValueError(f"candidates must be a whole number from 1 to {MAX_CANDIDATES}, got {candidates!r}")
    if rerank not in RERANKERS:
        raise ValueError(f"unknown rerank {rerank!r}; choose one of {list(RERANKERS)}")
    if rerank == "slots" and candidates > 1:
        if sources is None:
            raise ValueError("rerank='slots' reads each source's slots: it needs sources=[...], not labels; use "
                             "rerank='mbr'")
        for i, source in enumerate(sources):
            try:
                slots = parse_mr(source)
            except ValueError as e:
                raise ValueError(f"{name.format(i=i)}: {e}; rerank='slots' reads E2E meaning representations, "
                                 "use rerank='mbr' for other sources") from None
            if not slots:
                raise ValueError(f"{name.format(i=i)} is not an E2E meaning representation ('name : X | food : "
                                 "Y'): rerank='slots' reads their slots; use rerank='mbr' for other sources")


def candidate_seed(seed: int, j: int) -> int:
    """The noise seed of candidate j of an item seeded `seed`: the seed itself for j = 0, else a hash of both."""
    if j == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & MAX_SEED


def candidate_seeds(n: int, k: int, seed: int, seeds: list[int] | None) -> list[int]:
    """The noise seeds of n items' k candidates each, item after item: item i's own seed (seeds[i], or seed + i
    without `seeds`) through candidate_seed."""
    if seeds is None:
        check_seed(seed)
        seeds = [(seed + i) & MAX_SEED for i in range(n)]
    elif len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries for {n} items: pass one seed per item")
    for i, s in enumerate(seeds):
        check_seed(s, f"seeds[{i}]")
    return [candidate_seed(s, j) for s in seeds for j in range(k)]


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def sentence_bleu(hypothesis: list[str], reference: list[str], max_n: int = 4) -> float:
    """Smoothed sentence BLEU of token lists (add-one on the counts of 2- to 4-grams), in [0, 1]."""
    if not hypothesis or not reference:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        matches = sum(min(count, ref[gram]) for gram, count in hyp.items())
        total = max(0, len(hypothesis) - n + 1)
        smooth = 0 if n == 1 else 1
        if matches + smooth == 0:
            return 0.0
        log_precision += math.log((matches + smooth) / (total + smooth)) / max_n
    brevity = min(0.0, 1.0 - len(reference) / len(hypothesis))
    return math.exp(log_precision + brevity)


def mbr_scores(texts: list[str]) -> list[float]:
    """Each candidate's summed agreement (sentence BLEU) with the others."""
    tokens = [_tokens(t) for t in texts]
    return [sum(sentence_bleu(tokens[i], tokens[j]) for j in range(len(texts)) if j != i) for i in range(len(texts))]


def choose(texts: list[str], rerank: str, source: str | None = None) -> int:
    """The index of the candidate kept (module docstring)."""
    agreement = mbr_scores(texts)
    if rerank == "mbr":
        keys = [(a,) for a in agreement]
    else:
        keys = [(-slot_errors(source, t).errors, a) for t, a in zip(texts, agreement)]
    return max(range(len(texts)), key=lambda i: (keys[i], -i))
