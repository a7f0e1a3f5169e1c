"""Tile configurations tuned once on a GPU and stored in the repository, so that no run autotunes at start-up.

bench/gpu/tune_tiles.py times each candidate tiling of every matmul shape the engine launches (the sampling step's
and the beam decode's, per row count, dtype and weight format) on a GPU and writes the fastest per shape;
kernels/tiles.json holds the tables committed from such runs, one per GPU model (by the name CUDA reports).
A kernel's launch looks its shape up here first and falls back to its own rule where the table has nothing
(another GPU, another shape).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

TABLE = Path(__file__).with_name("tiles.json")
FORMAT = 1


def row_bucket(rows: int) -> int:
    """Rows rounded up to a power of two: shapes a tiling is tuned for (1, 2, 4, ..., 256, 512, ...)."""
    return 1 << max(0, rows - 1).bit_length()


def shape_key(rows: int, n: int, k: int, *, dtype: str, gelu: bool | str, weights: str = "same") -> str:
    """The table's key of an (rows, k) x (k, n) product: dtype the activations' (torch's name, "bfloat16"),
    gelu the epilogue (a GELU runs unsplit), weights "same" (the activations' dtype) or "fp8"."""
    epilogue = {False: "linear", True: "gelu", "tanh": "gelu_tanh"}[gelu]
    return f"{dtype}/{weights}/{epilogue}/m{row_bucket(rows)}/n{n}/k{k}"


@functools.cache
def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    table = json.loads(path.read_text())
    if table.get("format") != FORMAT:
        raise ValueError(f"{path} is tile table format {table.get('format')!r}, this ldlm reads {FORMAT}: tune "
                         "again with bench/gpu/tune_tiles.py")
    return table.get("gpus", {})


def tuned(kernel: str, gpu: str, key: str, path: Path | None = None) -> dict | None:
    """The stored tiling of `kernel` for `key` on the GPU named `gpu` (torch.cuda.get_device_name), or None;
    path: the table (default kernels/tiles.json)."""
    return _read(path or TABLE).get(gpu, {}).get(kernel, {}).get(key)


def merge(tables: list[dict]) -> dict:
    """Tables from several runs as one (later runs win per GPU, kernel and shape)."""
    gpus: dict = {}
    for table in tables:
        for gpu, kernels in table.get("gpus", {}).items():
            for kernel, shapes in kernels.items():
                gpus.setdefault(gpu, {}).setdefault(kernel, {}).update(shapes)
    return {"format": FORMAT, "gpus": gpus}
