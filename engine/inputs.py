"""Validation of user input, with errors that name the item and say what to do."""

from __future__ import annotations

import math
import re

import torch

MAX_TEMPERATURE = 2.0  # the starting noise's scale (Pipeline.sample_latents)
MAX_SEED = 2**63 - 1  # seeds are what torch.Generator.manual_seed takes without aliasing: [0, 2**63 - 1]
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in `text` (what a JSON "\\ud800" escape or a bad decode leaves,
    which no UTF-8 text holds), or None."""
    match = _SURROGATE.search(text)
    return None if match is None else match.start()


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
        position = lone_surrogate(text)
        if position is not None:
            raise ValueError(f"text {i} holds a lone surrogate ({text[position]!r} at character {position}), which is "
                             "not text: decode the input as UTF-8 (errors='strict') or remove the character")


def read_user_file(path, flag: str, kind: str) -> bytes:
    """The bytes of a file a user named with `flag` (e.g. --input), with errors that name it; `kind` says what
    to pass instead of a directory (e.g. "a JSONL file")."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{flag} {path} is a directory: pass {kind}") from None
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be read ({e.strerror})") from None


def is_number(value) -> bool:
    """An int or float that is not a bool (True is an int to Python, and runs as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_strength(strength: float) -> None:
    if not is_number(strength) or math.isnan(strength) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1] (the fraction of T to noise to), got {strength!r}")


def check_temperature(temperature) -> None:
    if not is_number(temperature) or math.isnan(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (the scale of the starting noise; "
                         f"1 samples as the model was trained), got {temperature!r}")


def check_seed(seed, name: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be a whole number in [0, 2**63 - 1], got {seed!r}")


def check_positive_int(value, name: str) -> None:
    """A whole number >= 1 (batch sizes, step counts, iterations)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def resolve_device(device) -> torch.device:
    """A torch.device from a name such as "cpu", "cuda" or "cuda:1", checked to exist here."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device name: use cpu, cuda or cuda:N") from e
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'a CPU-only build' if torch.version.cuda is None else 'no GPU visible'}): use "
                             "device cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA devices here, numbered "
                             "from 0")
    elif resolved.type != "cpu" and not (resolved.type == "mps" and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} is not available here: use cpu{' or cuda' * torch.cuda.is_available()}")
    return resolved


def check_count(n) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of samples must be a whole number >= 0, got {n!r}")


def nonfinite_items(x: torch.Tensor) -> list[int]:
    """Indices along dim 0 of the items holding NaN or inf. x: (B, ...)."""
    return (~torch.isfinite(x.flatten(1)).all(dim=1)).nonzero().flatten().tolist()
