"""`ldlm eval`: reconstruction and sample quality of a checkpoint (or of any file of samples) against references.

Rows of the result:
- model: reconstruction from clean latents (exact match, corpus BLEU, teacher-forced token accuracy) and
  unconditional samples scored against the references (MAUVE, Div, Mem, mean length, degenerate rate, and
  the share of words English word-frequency lists have never seen);
- samples: the same sample scores for a file of texts (for instance a plain language model's samples);
- reference: one half of the references scored against the other half, the ceiling for every figure.

MAUVE runs on sentence features of the offline default encoder (all-MiniLM-L6-v2, mean-pooled), with the
same number of texts on both sides.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch

from ldlm.evaluation import metrics
from ldlm.model.config import DEFAULT_ENCODER
from ldlm.model.encoder import LatentEncoder


@dataclass
class EvalSettings:
    num_samples: int = 500  # at most this many samples, scored against as many held-out references
    seed: int = 0
    sampler: str | None = None  # None: the checkpoint's default
    steps: int | None = None
    num_beams: int = 4
    decoding: str | None = None  # beam or nucleus; None: the checkpoint's default (nucleus when top_p is given)
    top_p: float | None = None  # nucleus threshold
    max_references: int = 1000  # references used for reconstruction
    reconstruction: bool = True  # False: score the model's samples only (sweeps of sampling settings)


def features(encoder: LatentEncoder, texts: list[str]):
    """Sentence features for MAUVE; an empty text gets a placeholder (it is counted as degenerate anyway)."""
    return encoder.encode([t if t.strip() else "[empty]" for t in texts]).cpu().numpy()


def token_accuracy(pipe, texts: list[str], batch_size: int = 64) -> float:
    """Teacher-forced next-token accuracy of the decoder on the texts' own clean latents."""
    correct = total = 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            ids, mask = pipe.decoder.tokenize(batch)
            ids, mask = ids.to(pipe.device), mask.to(pipe.device)
            predicted = pipe.decoder(pipe.encode(batch), ids, mask).argmax(dim=-1)
            correct += int(((predicted == ids) & mask.bool()).sum())
            total += int(mask.sum())
    return correct / total if total else 0.0


def reconstruction_scores(pipe, references: list[str], num_beams: int, progress: bool) -> dict:
    """Decode the references' own clean latents and compare with the references."""
    outputs = pipe.reconstruct(references, num_beams=num_beams, progress=progress)
    return {"n": len(references), "exact_match": metrics.exact_match(outputs, references),
            "bleu": metrics.corpus_bleu(outputs, references),
            # teacher forcing needs the PyTorch decoder (the onnx backend has no training graph)
            "token_accuracy": token_accuracy(pipe, references) if isinstance(pipe.decoder, torch.nn.Module) else None}


def sample_scores(samples: list[str], reference_features, train_texts: list[str], encoder: LatentEncoder,
                  seed: int) -> dict:
    return {
        "n": len(samples),
        "mauve": metrics.mauve_score(features(encoder, samples), reference_features, seed=seed),
        "div": metrics.diversity(samples),
        "mem": metrics.memorization(samples, train_texts),
        "mean_length": metrics.mean_length(samples),
        "degenerate": metrics.degenerate_rate(samples),
        "unknown_words": metrics.unknown_word_rate(samples),  # fluency that MAUVE's features cannot see
    }


def evaluate(references: list[str], train_texts: list[str], *, pipe=None, samples: list[str] | None = None,
             settings: EvalSettings | None = None, feature_encoder: LatentEncoder | None = None,
             progress: bool = True) -> dict:
    """Score a pipeline (reconstruction + its own samples) and/or a list of samples; add the reference row."""
    s = settings or EvalSettings()
    if len(references) < 4:
        raise ValueError(f"need at least 4 references to score (and to split in halves), got {len(references)}")
    encoder = feature_encoder or LatentEncoder.from_pretrained(DEFAULT_ENCODER)
    shuffled = references[:]
    random.Random(s.seed).shuffle(shuffled)
    # every row scores n texts against the same n held-out references (the second half), so that MAUVE,
    # Div and Mem compare like with like: Div in particular falls as the number of texts grows
    n = min(len(shuffled) // 2, s.num_samples)
    first_half, second_half = shuffled[:n], shuffled[n : 2 * n]
    second_features = features(encoder, second_half)  # the side every row is compared with, encoded once
    result = {"settings": asdict(s), "n": n, "rows": {}}

    if pipe is not None:
        row = {"reconstruction": reconstruction_scores(pipe, references[: s.max_references], s.num_beams, progress)
               } if s.reconstruction else {}
        generated = pipe.generate(n, steps=s.steps, sampler=s.sampler, seed=s.seed, num_beams=s.num_beams,
                                  decoding=s.decoding, top_p=s.top_p, progress=progress)
        row["samples"] = sample_scores(generated, second_features, train_texts, encoder, s.seed)
        row["examples"] = generated[:10]
        result["rows"]["model"] = row
    if samples is not None:
        if len(samples) < n:
            raise ValueError(f"--samples has {len(samples)} texts; give at least {n} (one per reference scored)")
        result["rows"]["samples"] = {"samples": sample_scores(samples[:n], second_features, train_texts, encoder, s.seed),
                                     "examples": samples[:10]}
    result["rows"]["reference"] = {"samples": sample_scores(first_half, second_features, train_texts, encoder, s.seed)}
    return result


def format_table(result: dict) -> str:
    cols = ["exact_match", "bleu", "token_accuracy", "mauve", "div", "mem", "mean_length", "degenerate",
            "unknown_words", "n"]
    lines = ["| row | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for name, row in result["rows"].items():
        values = {**row.get("reconstruction", {}), **row.get("samples", {})}
        if "reconstruction" in row:
            values["n"] = f"{row['reconstruction']['n']} / {row['samples']['n']}"
        cells = [f"{values[c]:.3f}" if isinstance(values.get(c), float) else str(values.get(c) or "-") for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
