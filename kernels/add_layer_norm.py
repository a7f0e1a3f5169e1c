"""Residual add and the next LayerNorm in one Triton kernel: h += y; out = LayerNorm(h).

A pre-norm transformer block ends each branch with a residual add whose result goes straight into the next
layer norm. Done by torch that is two kernels, and the sum makes a round trip through memory between them;
here one program per row reads h and y once, writes the new h (in place) and its normalized value. The norm
is taken of h as stored, so in bf16 or fp16 it sees the same rounded sum that torch's separate add would
have given its layer norm; statistics in fp32 whatever the storage dtype. Set TRITON_INTERPRET=1 before
triton is imported to run it on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_layer_norm_kernel(
    h_ptr, y_ptr, weight_ptr, bias_ptr, out_ptr,  # h, y, out: (n_rows, n_cols); weight, bias: (n_cols,)
    n_rows, n_cols, eps,
    ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr,  # rows per program; BLOCK_SIZE >= n_cols, a power of 2
):
    rows = tl.program_id(axis=0) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
    cols = tl.arange(0, BLOCK_SIZE)[None, :]  # (1, BLOCK_SIZE)
    mask = (rows < n_rows) & (cols < n_cols)
    offsets = rows * n_cols + cols
    h = tl.load(h_ptr + offsets, mask=mask, other=0.0)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
    summed = (h.to(tl.float32) + y.to(tl.float32)).to(h_ptr.dtype.element_ty)  # the residual stream, as stored
    tl.store(h_ptr + offsets, summed, mask=mask)
    s = summed.to(tl.float32)
    mean = tl.sum(s, axis=1)[:, None] / n_cols  # (ROWS, 1)
    centered = tl.where(mask, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1)[:, None] / n_cols + eps)
    w = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, (centered * rstd * w + b).to(out_ptr.dtype.element_ty), mask=mask)


def add_layer_norm(h: torch.Tensor, y: torch.Tensor, norm: torch.nn.LayerNorm, *,
                   rows_per_program: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """h += y in place, and norm(h) as a new tensor: (h, norm(h)). h, y: (..., C) contiguous, same shape and
    dtype; norm: a LayerNorm over C with an affine weight and bias. rows_per_program (a power of 2): by default
    one on a GPU (a program per row keeps every multiprocessor busy), every row at once in Triton's CPU
    interpreter (which runs programs one after another, each as whole-array operations)."""
    if h.shape != y.shape or h.dtype != y.dtype:
        raise ValueError(f"h {tuple(h.shape)} {h.dtype} and y {tuple(y.shape)} {y.dtype} must match")
    if not (h.is_contiguous() and y.is_contiguous()):
        raise ValueError("h and y must be contiguous")
    n_cols = h.shape[-1]
    if tuple(norm.normalized_shape) != (n_cols,) or norm.weight is None or norm.bias is None:
        raise ValueError(f"norm must be an affine LayerNorm over the last dimension ({n_cols}), got {norm}")
    n_rows = h.numel() // n_cols
    if rows_per_program is None:
        rows_per_program = 1 if h.is_cuda else triton.next_power_of_2(n_rows)
    out = torch.empty_like(h)
    _add_layer_norm_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        h, y, norm.weight, norm.bias, out, n_rows, n_cols, norm.eps,
        ROWS=rows_per_program, BLOCK_SIZE=triton.next_power_of_2(n_cols),
    )
    return h, out
