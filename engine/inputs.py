"""Validation of user input, with errors that name the item and say what to do."""

from __future__ import annotations

import math

import torch


def check_texts(texts) -> None:
    """A list (or tuple) of non-empty strings; an empty list is allowed and gives empty results."""
    if isinstance(texts, str):
        raise TypeError("pass a list of strings, not a single string: wrap it as [text]")
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"pass a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"text {i} is empty: remove it or give it at least one non-space character")


def check_strength(strength: float) -> None:
    if not isinstance(strength, (int, float)) or math.isnan(strength) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1] (the fraction of T to noise to), got {strength!r}")


def check_count(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of samples must be a whole number >= 0, got {n!r}")


def nonfinite_items(x: torch.Tensor) -> list[int]:
    """Indices along dim 0 of the items holding NaN or inf. x: (B, ...)."""
    return (~torch.isfinite(x.flatten(1)).all(dim=1)).nonzero().flatten().tolist()
