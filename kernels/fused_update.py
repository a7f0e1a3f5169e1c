"""The fused per-step update of an x0-predicting sampler, as one Triton kernel.

    x_next = a[s] * clamp(x0_hat) + b[s] * x_t + c[s] * noise,   s = *step (a device counter)

One pass over memory: reads x_t, x0_hat and noise once, writes x_next once, in fp32 arithmetic
whatever the storage dtype. Optionally it also records the first step whose output holds a NaN or an
infinity (as stored), in a device flag, so the sampling loop needs no separate check. The coefficients
come from device tables (ldlm.step_tables) indexed by a step counter that lives on the device, so a
captured CUDA graph replays correctly at every step without Python scalars. Set TRITON_INTERPRET=1
before triton is imported to run it on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fused_update_kernel(
    x_ptr, x0_ptr, noise_ptr, out_ptr,  # (n_elements,) each
    coef_x0_ptr, coef_xt_ptr, coef_noise_ptr,  # (S,) float32 tables
    step_ptr,  # (1,) int64 device step counter
    first_bad_ptr,  # (1,) int64: -1 until an output is non-finite, then that step (read only when TRACK_NONFINITE)
    n_elements, clamp_value,
    CLAMP: tl.constexpr, TRACK_NONFINITE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(axis=0)
    offsets = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    step = tl.load(step_ptr)
    a = tl.load(coef_x0_ptr + step)
    b = tl.load(coef_xt_ptr + step)
    c = tl.load(coef_noise_ptr + step)
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    x0 = tl.load(x0_ptr + offsets, mask=mask).to(tl.float32)
    z = tl.load(noise_ptr + offsets, mask=mask).to(tl.float32)
    if CLAMP:
        x0 = tl.minimum(tl.maximum(x0, -clamp_value), clamp_value)
    out = (a * x0 + b * x + c * z).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, out, mask=mask)
    if TRACK_NONFINITE:  # checked as stored: a value finite in fp32 can overflow fp16
        stored = out.to(tl.float32)
        bad = mask & ((stored != stored) | (tl.abs(stored) == float("inf")))
        if tl.sum(bad.to(tl.int32), axis=0) > 0:  # the first program of the first bad step wins; later ones keep it
            tl.atomic_cas(first_bad_ptr, tl.full([], -1, tl.int64), step.to(tl.int64))


def fused_update(
    x_t: torch.Tensor,
    x0_hat: torch.Tensor,
    noise: torch.Tensor,
    coef_x0: torch.Tensor,
    coef_xt: torch.Tensor,
    coef_noise: torch.Tensor,
    step: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    clamp: float | None = None,
    first_bad: torch.Tensor | None = None,
    block_size: int = 1024,
) -> torch.Tensor:
    """x_next for one sampler step. x_t, x0_hat, noise: same shape and dtype, contiguous; tables: (S,) float32
    on the same device; step: (1,) int64 device tensor. `out` may alias x_t (in-place update). first_bad: a
    (1,) int64 device flag holding -1; the first step whose output has a NaN or an infinity is written there."""
    if not (x_t.shape == x0_hat.shape == noise.shape):
        raise ValueError(f"shapes differ: x_t {tuple(x_t.shape)}, x0_hat {tuple(x0_hat.shape)}, noise {tuple(noise.shape)}")
    if not (x_t.is_contiguous() and x0_hat.is_contiguous() and noise.is_contiguous()):
        raise ValueError("x_t, x0_hat and noise must be contiguous")
    for name, table in (("coef_x0", coef_x0), ("coef_xt", coef_xt), ("coef_noise", coef_noise)):
        if table.dtype != torch.float32 or table.device != x_t.device:
            raise ValueError(f"{name} must be a float32 table on {x_t.device}, got {table.dtype} on {table.device}")
    for name, counter in (("step", step), ("first_bad", first_bad)):
        if counter is not None and (counter.dtype != torch.int64 or counter.numel() != 1):
            raise ValueError(f"{name} must be a one-element int64 tensor on the device")
    out = torch.empty_like(x_t) if out is None else out
    n = x_t.numel()
    grid = (triton.cdiv(n, block_size),)
    _fused_update_kernel[grid](
        x_t, x0_hat, noise, out, coef_x0, coef_xt, coef_noise, step,
        step if first_bad is None else first_bad,  # an unread stand-in when the check is off
        n,
        float(clamp) if clamp is not None else 0.0,
        CLAMP=clamp is not None, TRACK_NONFINITE=first_bad is not None, BLOCK_SIZE=block_size,
    )
    return out
