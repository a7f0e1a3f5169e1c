"""Static shapes: sizes rounded up to a bucket, so that code compiled or captured for a shape (CUDA graphs, the
engine's static buffers, torch.compile) serves every size in its bucket."""

from __future__ import annotations


def next_power_of_two(n: int) -> int:
    """The static size n rows or condition tokens run at (n >= 1): the next power of two."""
    return 1 << max(0, n - 1).bit_length()


def batch_bucket(n: int, limit: int) -> int:
    """The static batch size a batch of n runs at on the engine: the next power of two, at most `limit`."""
    return min(limit, next_power_of_two(n))
