"""The beam search's per-token selection in two Triton kernels: LM head, log-softmax, n-gram ban, beam scores, top-2K.

A beam step turns each row's last hidden state h (R = B items x K beams, E) into the item's 2K best (beam,
token) continuations: logits = ln_f(h) W^T over the vocabulary (V = 50,257 for GPT-2), log-softmax per row,
the n-gram ban (-inf), plus the beam's running score, then top-2K over each item's K x V scores. In torch that
is a (R, V) logits tensor written and read back four or five times. Here the logits never leave the chip:

1. `_head_tiles_kernel`, one program per (rows tile, vocabulary tile): the LM head's product for its tile (the
   layer norm as its prologue, as ldlm.kernels.fused_linear), then per row the tile's max and sum of
   exp(logit - max) (for the log-softmax's normalizer, over every token, banned or not, as log_softmax runs
   before the ban), and the tile's C = 2K best unbanned tokens by logit. Row tiles run fastest in launch order,
   so the programs reading one vocabulary tile of W run together and W comes from HBM about once.
2. `_beam_topk_kernel`, one program per item: each beam's log-normalizer from its tiles' (max, sum), then the
   2K best of its K x tiles x C candidates by score = (logit - normalizer) + running score.

The item's top 2K are among the union of each tile's top 2K per row, so this is exactly torch's top-k, in
the order score descending, then flat index (beam x V + token) ascending on ties. Accumulation and the
log-softmax are fp32 whatever the storage dtype. Set TRITON_INTERPRET=1 before triton is imported to run it on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fused_linear import normed_tile, row_norm_stats

_LAST = tl.constexpr(2**62)  # an index past every (beam, token) pair


@triton.jit
def _head_tiles_kernel(
    h_ptr, ln_w_ptr, ln_b_ptr, w_ptr, banned_ptr,  # h (R, E); ln_* (E,); w (V, E), E contiguous; banned (R, W) int
    tile_max_ptr, tile_sum_ptr, cand_logit_ptr, cand_token_ptr,  # (R, n_tiles) fp32 each; (R, n_tiles, C)
    R, V, E, W, n_tiles, eps, stride_hr, stride_wv,
    C: tl.constexpr,  # candidates kept per row and tile (2K)
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_FP32: tl.constexpr,  # widen both operands to fp32 before the product (the CPU interpreter)
):
    pid_r, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # (BLOCK_V,) token ids
    es = tl.arange(0, BLOCK_E)
    row_ok, col_ok = rows < R, cols < V
    h_rows = h_ptr + rows[:, None] * stride_hr  # (BLOCK_R, 1)
    mean, rstd = row_norm_stats(h_rows, row_ok, E, eps, BLOCK_R, BLOCK_E)  # ln_f's, as torch's LayerNorm
    acc = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + es
        e_ok = e < E
        x_mask = row_ok[:, None] & e_ok[None, :]
        x = tl.load(h_rows + e[None, :], mask=x_mask, other=0.0)  # (BLOCK_R, BLOCK_E)
        x = normed_tile(x, x_mask, e, e_ok, mean, rstd, ln_w_ptr, ln_b_ptr)
        w = tl.load(w_ptr + cols[None, :] * stride_wv + e[:, None], mask=e_ok[:, None] & col_ok[None, :],
                    other=0.0)  # (BLOCK_E, BLOCK_V): W^T's tile
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w, input_precision="ieee")
    logits = tl.where(col_ok[None, :], acc, float("-inf"))  # padding columns count for nothing
    top = tl.max(logits, axis=1)  # (BLOCK_R,): finite, every tile holds a real column
    stats = rows * n_tiles + pid_v
    tl.store(tile_max_ptr + stats, top, mask=row_ok)
    tl.store(tile_sum_ptr + stats, tl.sum(tl.exp(logits - top[:, None]), axis=1), mask=row_ok)
    banned = (rows[:, None] < 0) & (cols[None, :] < 0)  # (BLOCK_R, BLOCK_V), all False
    for j in range(0, W):  # each row's banned tokens, -1 where none
        ids = tl.load(banned_ptr + rows * W + j, mask=row_ok, other=-1)
        banned = banned | (cols[None, :] == ids[:, None])
    scores = tl.where(banned, float("-inf"), logits)
    out = (rows * n_tiles + pid_v) * C  # (BLOCK_R,)
    for c in tl.static_range(C):  # the C best by logit, the lowest token first on ties
        best = tl.max(scores, axis=1)
        token = tl.min(tl.where(scores == best[:, None], cols[None, :], 2147483647), axis=1)
        tl.store(cand_logit_ptr + out + c, best, mask=row_ok)
        tl.store(cand_token_ptr + out + c, token, mask=row_ok)
        scores = tl.where(cols[None, :] == token[:, None], float("-inf"), scores)


@triton.jit
def _beam_topk_kernel(
    tile_max_ptr, tile_sum_ptr, cand_logit_ptr, cand_token_ptr, running_ptr,  # kernel 1's; running (B, K) fp32
    out_score_ptr, out_index_ptr,  # (B, C) fp32 and int64: the item's C best scores and their beam * V + token
    V, n_tiles,
    K: tl.constexpr, C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    item = tl.program_id(0)
    beams = tl.arange(0, BLOCK_K)
    beam_ok = beams < K
    rows = item * K + beams  # (BLOCK_K,)
    top = tl.full((BLOCK_K,), float("-inf"), tl.float32)  # each beam's log-sum-exp over its tiles, online
    total = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = beam_ok[:, None] & (t < n_tiles)[None, :]
        tile_max = tl.load(tile_max_ptr + rows[:, None] * n_tiles + t[None, :], mask=mask, other=float("-inf"))
        tile_sum = tl.load(tile_sum_ptr + rows[:, None] * n_tiles + t[None, :], mask=mask, other=0.0)
        new_top = tl.where(beam_ok, tl.maximum(top, tl.max(tile_max, axis=1)), 0.0)
        total = total * tl.exp(top - new_top) + tl.sum(tile_sum * tl.exp(tile_max - new_top[:, None]), axis=1)
        top = new_top
    log_norm = top + tl.log(tl.where(beam_ok, total, 1.0))  # (BLOCK_K,)
    running = tl.load(running_ptr + rows, mask=beam_ok, other=0.0)
    N = n_tiles * C  # candidates per beam
    last_score = tl.max(tl.full((BLOCK_K,), float("inf"), tl.float32), axis=0)  # the previous pick (a scalar)
    last_index = tl.min(tl.full((BLOCK_K,), -1, tl.int64), axis=0)
    for c in tl.static_range(C):  # pick c: the best after the previous pick, in (score desc, index asc) order
        best_score = tl.max(tl.full((BLOCK_K,), float("-inf"), tl.float32), axis=0)
        best_index = tl.min(tl.full((BLOCK_K,), _LAST, tl.int64), axis=0)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            mask = beam_ok[:, None] & (n < N)[None, :]
            at = rows[:, None] * N + n[None, :]
            logit = tl.load(cand_logit_ptr + at, mask=mask, other=float("-inf"))
            token = tl.load(cand_token_ptr + at, mask=mask, other=0).to(tl.int64)
            score = (logit - log_norm[:, None]) + running[:, None]  # as log_softmax, then + the beam's score
            index = beams[:, None].to(tl.int64) * V + token
            after = (score < last_score) | ((score == last_score) & (index > last_index))
            ok = mask & after
            score = tl.where(ok, score, float("-inf"))
            index = tl.where(ok, index, _LAST)
            chunk_score = tl.max(tl.max(score, axis=1), axis=0)
            chunk_index = tl.min(tl.min(tl.where(score == chunk_score, index, _LAST), axis=1), axis=0)
            better = (chunk_score > best_score) | ((chunk_score == best_score) & (chunk_index < best_index))
            best_score = tl.where(better, chunk_score, best_score)
            best_index = tl.where(better, chunk_index, best_index)
        tl.store(out_score_ptr + item * C + c, best_score)
        tl.store(out_index_ptr + item * C + c, best_index)
        last_score, last_index = best_score, best_index


@dataclass(frozen=True)
class HeadTiles:
    """The first kernel's tiling: rows and vocabulary columns a program, E a loop step."""

    block_r: int
    block_v: int
    block_e: int


def default_head_tiles(R: int, V: int, *, device: torch.device) -> HeadTiles:
    """On a GPU: up to 64 rows (tl.dot's minimum is 16) x 128 tokens a program (not yet tuned on the GPU).
    In Triton's CPU interpreter, which runs programs one after another: as few programs as possible."""
    block_r = min(64, max(16, triton.next_power_of_2(R)))
    if device.type != "cuda":
        return HeadTiles(block_r, min(1024, triton.next_power_of_2(V)), 64)
    return HeadTiles(block_r, 128, 64)


def beam_head_topk(h: torch.Tensor, norm: torch.nn.LayerNorm, head: torch.nn.Linear, running_scores: torch.Tensor,
                   banned: torch.Tensor, *, candidates: int,
                   tiles: HeadTiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The item's `candidates` best continuations: top-k over (beam, token) of log_softmax(head(norm(h))),
    banned tokens at -inf, plus the beam's running score.

    h: (B * K, E) each row's last hidden state, before the final norm (row b * K + k: item b's beam k); norm:
    an affine LayerNorm over E (GPT-2's ln_f); head: an nn.Linear (V, E) without bias (GPT-2's tied LM head);
    running_scores: (B, K) fp32; banned: (B * K, W) integer token ids each row may not choose, -1 for none
    (W may be 0). Returns (scores (B, candidates) fp32, index (B, candidates) int64 = beam * V + token), best
    first: what scores.view(B, K * V).topk(candidates) returns."""
    B, K = running_scores.shape
    R, E = h.shape
    V = head.weight.shape[0]
    if R != B * K:
        raise ValueError(f"h has {R} rows; running_scores says {B} items x {K} beams = {B * K}")
    if head.weight.shape[1] != E or head.bias is not None:
        raise ValueError(f"head must be a Linear({E}, V) without bias (GPT-2's LM head), got {head}")
    if tuple(norm.normalized_shape) != (E,) or norm.weight is None or norm.bias is None:
        raise ValueError(f"norm must be an affine LayerNorm over the last dimension ({E}), got {norm}")
    if not 1 <= candidates <= K * V:
        raise ValueError(f"candidates must be between 1 and beams x vocabulary ({K * V}), got {candidates}")
    if running_scores.dtype != torch.float32:
        raise ValueError(f"running_scores must be float32, got {running_scores.dtype}")
    if banned.shape[0] != R or banned.dim() != 2 or banned.dtype.is_floating_point:
        raise ValueError(f"banned must be ({R}, W) integer token ids, got {tuple(banned.shape)} {banned.dtype}")
    if len({(t.dtype, t.device) for t in (h, head.weight, norm.weight, norm.bias)}) != 1:
        raise ValueError("h, the head and the norm must share a dtype and device")
    if h.stride(-1) != 1 or head.weight.stride(-1) != 1:
        raise ValueError("h and the head's weight need contiguous rows (call .contiguous())")
    tiles = tiles or default_head_tiles(R, V, device=h.device)
    n_tiles = triton.cdiv(V, tiles.block_v)
    dev = h.device
    tile_max = torch.empty(R, n_tiles, dtype=torch.float32, device=dev)
    tile_sum = torch.empty(R, n_tiles, dtype=torch.float32, device=dev)
    cand_logit = torch.empty(R, n_tiles, candidates, dtype=torch.float32, device=dev)
    cand_token = torch.empty(R, n_tiles, candidates, dtype=torch.int32, device=dev)
    banned = banned.to(torch.int32).contiguous()
    _head_tiles_kernel[(triton.cdiv(R, tiles.block_r), n_tiles)](
        h, norm.weight, norm.bias, head.weight, banned, tile_max, tile_sum, cand_logit, cand_token,
        R, V, E, banned.shape[1], n_tiles, norm.eps, h.stride(0), head.weight.stride(0),
        C=candidates, BLOCK_R=tiles.block_r, BLOCK_V=tiles.block_v, BLOCK_E=tiles.block_e,
        DOT_FP32=not h.is_cuda,  # the interpreter's bf16 products (see ldlm.kernels.fused_linear)
    )
    scores = torch.empty(B, candidates, dtype=torch.float32, device=dev)
    index = torch.empty(B, candidates, dtype=torch.int64, device=dev)
    _beam_topk_kernel[(B,)](
        tile_max, tile_sum, cand_logit, cand_token, running_scores.contiguous(), scores, index, V, n_tiles,
        K=K, C=candidates, BLOCK_K=triton.next_power_of_2(K), BLOCK_T=min(128, triton.next_power_of_2(n_tiles)),
        BLOCK_N=min(256, triton.next_power_of_2(n_tiles * candidates)),
    )
    return scores, index
