"""One-query attention over a static KV cache read through beam indirection, in one Triton kernel.

Beam search reorders its hypotheses every token. A static cache that follows them must gather every row's
keys and values into their new order each token: the whole cache read and written once a token (on the H200
at batch 64, 1 ms of a 3 ms bf16 token, bench/RESULTS.md). But a cache slot (row r, position p) is written
once, at step p, and never again, so no data need move: a table `source` (rows, max_len) says which row's slot
holds hypothesis r's key and value at position p, and a reorder gathers that small table instead. This kernel
attends through it: for each (row, head) one program walks the positions up to the current one in blocks,
loads each position's key and value from the row the table names, and keeps a running softmax (the online
softmax of FlashAttention, Dao et al. 2022, for one query). Positions after the current one are neither read
nor counted. Statistics and the sum in fp32 whatever the storage dtype. TRITON_INTERPRET=1 runs it on CPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _beam_attention_kernel(
    q_ptr,  # (R, H, hd) with strides (stride_qr, stride_qh, 1): one query per row and head
    k_ptr, v_ptr,  # (R, H, max_len, hd) contiguous: one layer's cache
    source_ptr,  # (R, max_len) int64 contiguous: the row whose slot holds (row r, position p)
    out_ptr,  # (R, H, hd) with strides (stride_or, stride_oh, 1)
    position_ptr,  # (1,) int64: the current position; positions 0 .. position attend
    scale,  # 1 / sqrt(hd)
    stride_qr, stride_qh, stride_or, stride_oh,
    N_HEADS: tl.constexpr, MAX_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row, head = tl.program_id(axis=0), tl.program_id(axis=1)
    dims = tl.arange(0, HEAD_DIM)  # (hd,)
    q = tl.load(q_ptr + row * stride_qr + head * stride_qh + dims).to(tl.float32) * scale  # (hd,)
    position = tl.load(position_ptr)
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    acc = tl.zeros((HEAD_DIM,), tl.float32)
    for start in range(0, MAX_LEN, BLOCK_P):
        positions = start + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
        live = (positions <= position) & (positions < MAX_LEN)
        source = tl.load(source_ptr + row * MAX_LEN + positions, mask=live, other=0)  # (BLOCK_P,)
        slots = ((source * N_HEADS + head) * MAX_LEN + positions) * HEAD_DIM  # (BLOCK_P,)
        offsets = slots[:, None] + dims[None, :]  # (BLOCK_P, hd)
        k = tl.load(k_ptr + offsets, mask=live[:, None], other=0.0).to(tl.float32)
        scores = tl.where(live, tl.sum(k * q[None, :], axis=1), float("-inf"))  # (BLOCK_P,)
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))  # finite: position 0 is always live
        weights = tl.exp(scores - new_max)  # (BLOCK_P,); 0 where not live
        correction = tl.exp(running_max - new_max)
        v = tl.load(v_ptr + offsets, mask=live[:, None], other=0.0).to(tl.float32)
        acc = acc * correction + tl.sum(weights[:, None] * v, axis=0)
        running_sum = running_sum * correction + tl.sum(weights, axis=0)
        running_max = new_max
    tl.store(out_ptr + row * stride_or + head * stride_oh + dims, (acc / running_sum).to(out_ptr.dtype.element_ty))


def beam_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, source: torch.Tensor,
                   position: torch.Tensor, scale: float, *, block_p: int = 32) -> torch.Tensor:
    """softmax(q k^T * scale) v over positions 0..position, row r's key and value at position p taken from row
    source[r, p] of the cache. q: (R, H, 1, hd) (any strides with unit stride in hd); k_cache, v_cache:
    (R, H, max_len, hd) contiguous, q's dtype; source: (R, max_len) int64; position: a one-element int64
    tensor on the device. Returns (R, H, 1, hd), laid out as (R, 1, H, hd) so that merging the heads needs
    no copy."""
    R, H, S, hd = q.shape
    if S != 1:
        raise ValueError(f"one query per row and head, got {S}")
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (R, H) or k_cache.shape[-1] != hd:
        raise ValueError(f"caches {tuple(k_cache.shape)} and {tuple(v_cache.shape)} must be (R, H, max_len, hd) "
                         f"for q {tuple(q.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and source.is_contiguous()) or q.stride(-1) != 1:
        raise ValueError("the caches and source must be contiguous, and q's last dimension too")
    max_len = k_cache.shape[2]
    if source.shape != (R, max_len) or source.dtype != torch.int64:
        raise ValueError(f"source must be int64 ({R}, {max_len}), got {source.dtype} {tuple(source.shape)}")
    if hd & (hd - 1):
        raise ValueError(f"head_dim must be a power of 2, got {hd}")
    out = torch.empty(R, 1, H, hd, dtype=q.dtype, device=q.device).transpose(1, 2)  # (R, H, 1, hd)
    _beam_attention_kernel[(R, H)](
        q, k_cache, v_cache, source, out, position, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        N_HEADS=H, MAX_LEN=max_len, HEAD_DIM=hd, BLOCK_P=block_p,
    )
    return out


def beam_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, source: torch.Tensor,
                             position: torch.Tensor, scale: float) -> torch.Tensor:
    """beam_attention in torch: the cache gathered through `source` (a copy of it), then masked attention."""
    R, H, _, hd = q.shape
    max_len = k_cache.shape[2]
    slots = torch.arange(max_len, device=q.device)
    k = k_cache[source, :, slots].transpose(1, 2)  # (R, H, max_len, hd): row r, position p from source[r, p]
    v = v_cache[source, :, slots].transpose(1, 2)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (R, H, 1, max_len)
    scores = scores.masked_fill(slots > position.view(()), float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)  # (R, H, 1, hd)
