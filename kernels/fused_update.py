"""The fused per-step update of an x0-predicting sampler, as one Triton kernel.

    x_next = a[s] * clamp(x0_hat) + b[s] * x_t + c[s] * noise [+ p[s] * x0_prev],   s = *step (a device counter)

One pass over memory: reads x_t, x0_hat and noise once, writes x_next once, in fp32 arithmetic
whatever the storage dtype. A multistep solver (DPM-Solver++(2M)) also reads the previous step's clamped
x0_hat from a history buffer and leaves this step's there for the next (read, then overwritten, element by
element: no copy kernel). Optionally it also records the first step whose output holds a NaN or an
infinity (as stored), in a device flag, so the sampling loop needs no separate check. The coefficients
come from device tables (ldlm.fast.step_tables) indexed by a step counter that lives on the device, so a
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
    history_ptr,  # (n_elements,): the previous step's clamped x0_hat in, this step's out (read only when HISTORY)
    coef_x0_ptr, coef_xt_ptr, coef_noise_ptr, coef_prev_ptr,  # (S,) float32 tables (coef_prev read only when HISTORY)
    step_ptr,  # (1,) int64 device step counter
    first_bad_ptr,  # (1,) int64: -1 until an output is non-finite, then that step (read only when TRACK_NONFINITE)
    n_elements, clamp_value,
    CLAMP: tl.constexpr, TRACK_NONFINITE: tl.constexpr, HISTORY: tl.constexpr, BLOCK_SIZE: tl.constexpr,
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
    out = a * x0 + b * x + c * z
    if HISTORY:
        p = tl.load(coef_prev_ptr + step)
        out += p * tl.load(history_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(history_ptr + offsets, x0.to(history_ptr.dtype.element_ty), mask=mask)
    out = out.to(out_ptr.dtype.element_ty)
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
    history: torch.Tensor | None = None,
    coef_prev: torch.Tensor | None = None,
    block_size: int = 1024,
) -> torch.Tensor:
    """x_next for one sampler step. x_t, x0_hat, noise: same shape and dtype, contiguous; tables: (S,) float32
    on the same device; step: (1,) int64 device tensor. `out` may alias x_t (in-place update). first_bad: a
    (1,) int64 device flag holding -1; the first step whose output has a NaN or an infinity is written there.
    history and coef_prev (a multistep solver's, both or neither): x_t's shape and dtype, holding the previous
    step's clamped x0_hat (anything finite at the first step, whose coef_prev is 0), and its (S,) table; the
    kernel adds coef_prev[s] * history and leaves this step's clamped x0_hat in history."""
    if (history is None) != (coef_prev is None):
        raise ValueError("pass history and coef_prev together (a multistep solver), or neither")
    tensors = {"x_t": x_t, "x0_hat": x0_hat, "noise": noise, **({"history": history} if history is not None else {})}
    if len({tuple(t.shape) for t in tensors.values()}) > 1:
        raise ValueError("shapes differ: " + ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items()))
    if not all(t.is_contiguous() for t in tensors.values()):
        raise ValueError(f"{', '.join(tensors)} must be contiguous")
    if history is not None and history.dtype != x_t.dtype:
        raise ValueError(f"history must be {x_t.dtype} like x_t, got {history.dtype}")
    tables = {"coef_x0": coef_x0, "coef_xt": coef_xt, "coef_noise": coef_noise, "coef_prev": coef_prev}
    for name, table in ((name, table) for name, table in tables.items() if table is not None):
        if table.dtype != torch.float32 or table.device != x_t.device:
            raise ValueError(f"{name} must be a float32 table on {x_t.device}, got {table.dtype} on {table.device}")
    for name, counter in (("step", step), ("first_bad", first_bad)):
        if counter is not None and (counter.dtype != torch.int64 or counter.numel() != 1):
            raise ValueError(f"{name} must be a one-element int64 tensor on the device")
    out = torch.empty_like(x_t) if out is None else out
    n = x_t.numel()
    grid = (triton.cdiv(n, block_size),)
    _fused_update_kernel[grid](
        x_t, x0_hat, noise, out,
        x_t if history is None else history,  # unread stand-ins when there is no history
        coef_x0, coef_xt, coef_noise, coef_x0 if coef_prev is None else coef_prev,
        step,
        step if first_bad is None else first_bad,  # an unread stand-in when the check is off
        n,
        float(clamp) if clamp is not None else 0.0,
        CLAMP=clamp is not None, TRACK_NONFINITE=first_bad is not None, HISTORY=history is not None,
        BLOCK_SIZE=block_size,
    )
    return out
