"""GPT-2 forward passes over a preallocated KV cache (gpt-fast style), reusing a loaded model's weights.

The cache has a fixed shape (layers, rows, heads, max_len, head_dim) with rows = batch * beams, so every
decode step has static shapes and can be captured as a CUDA graph. Positions past the current one hold
stale values and are masked out. It is double-buffered: a beam reorder gathers the rows from the current
cache into the other one, which becomes current (one read and one write of the cache per token, where
reordering in place takes a temporary: two of each).

A step's attention has one query per row. SDPA's fused kernels tile 64 queries, so for one they spend 64 times
the work (on the H200 at batch 64, fp32: 210 us a layer, a third of the token's kernel time). Two other ways:
attention="matmul", two batched matmuls around a softmax that read the cache once; and attention="indirect",
which moves no cache at all: a slot (row, position) is written once, so a small table says which row's slot
holds each hypothesis's key and value, a reorder gathers the table, and a Triton kernel
(ldlm.kernels.beam_attention) attends through it, reading only the positions written so far, from one cache
instead of two. Neither is the default yet: SDPA is what ran on the GPU; bench/gpu/gpu_profile.py times all three.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel
from transformers.activations import NewGELUActivation

from ldlm.kernels.reference import residual_norm

ATTENTION = ("sdpa", "matmul", "indirect")


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """The same memory as 8-byte integers where the last dimension allows (a bit-exact copy moves fewer items)."""
    return t.view(torch.int64) if t.is_contiguous() and t.shape[-1] * t.element_size() % 8 == 0 else t


def check_supported(gpt2: GPT2LMHeadModel) -> None:
    cfg = gpt2.config
    unsupported = {"scale_attn_by_inverse_layer_idx": True, "reorder_and_upcast_attn": True, "scale_attn_weights": False}
    bad = [name for name, value in unsupported.items() if getattr(cfg, name, not value) == value]
    if bad:
        raise NotImplementedError(f"the static-KV decoder does not implement GPT-2 options {bad}; use the reference")


class StaticKVGPT2:
    """Prefill and one-token steps of a GPT2LMHeadModel with a static KV cache."""

    def __init__(self, gpt2: GPT2LMHeadModel, rows: int, max_len: int, *, fused_norms: bool = False,
                 attention: str | None = None, fused_blocks: bool = False):
        """rows: batch x beams; max_len: prefix + new tokens; fused_norms: each residual add and the layer norm
        after it as one Triton kernel (ldlm.kernels.add_layer_norm; on CPU only through TRITON_INTERPRET=1);
        attention: a step's one-query attention as "sdpa" (torch's scaled_dot_product_attention, the default),
        "matmul" (two batched matmuls around a softmax) or "indirect" (the Triton kernel reading the cache
        through a table of source rows, which reorders replace; on CPU only through TRITON_INTERPRET=1);
        fused_blocks: a step's every matmul one Triton kernel with the layer norm before it and the bias, GELU and
        residual after it (ldlm.kernels.fused_linear; the norms are inside it, fused_norms unused)."""
        check_supported(gpt2)
        param = next(gpt2.parameters())
        attention = attention or "sdpa"
        if attention not in ATTENTION:
            raise ValueError(f"attention={attention!r}: use one of {ATTENTION}")
        self.attention = attention
        self.gpt2 = gpt2
        cfg = gpt2.config
        act = gpt2.transformer.h[0].mlp.act
        # GPT-2's gelu_new spelled out in eight elementwise kernels; torch's tanh GELU is the same function in
        # one (transformers' gelu_pytorch_tanh), equal but for rounding
        self.act = functools.partial(F.gelu, approximate="tanh") if isinstance(act, NewGELUActivation) else act
        self.add_norm = residual_norm(fused_norms)  # (h, y, norm) -> (h + y, norm(h + y))
        self.fused_blocks = fused_blocks
        if fused_blocks:
            if not isinstance(act, NewGELUActivation):
                raise NotImplementedError(f"fused_blocks implements GPT-2's gelu_new, not {type(act).__name__}")
            from ldlm.kernels.fused_linear import fused_linear

            self.linear = fused_linear  # (x, linear, *, norm, gelu, residual) -> act(norm(x) W^T + b) + residual
        t = gpt2.transformer
        self.following_norms = (*(block.ln_1 for block in t.h[1:]), t.ln_f)  # the norm after each block
        if max_len > cfg.n_positions:
            raise ValueError(f"max_len {max_len} exceeds the decoder's n_positions {cfg.n_positions}")
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.scale = self.head_dim**-0.5  # GPT-2's scale_attn_weights (check_supported)
        shape = (cfg.n_layer, rows, self.n_head, max_len, self.head_dim)
        indirect = attention == "indirect"
        # 2 (indirect: 1) x (keys, values), each (L, R, H, max_len, hd)
        self._caches = [tuple(torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in "kv")
                        for _ in range(1 if indirect else 2)]
        self.current = 0  # the cache (indirect: the source table) steps read and write; a reorder switches
        self.positions = torch.arange(max_len, device=param.device)  # (max_len,)
        self.row_ids = torch.arange(rows, device=param.device)[:, None]  # (R, 1)
        # indirect: row r's key and value at position p live in row _sources[current][r, p]'s slot
        self._sources = [torch.zeros(rows, max_len, dtype=torch.int64, device=param.device)
                         for _ in range(2)] if indirect else None
        if indirect:
            from ldlm.kernels.beam_attention import beam_attention

            self._beam_attention = beam_attention
        self._mask_values = torch.tensor([0.0, float("-inf")], dtype=param.dtype, device=param.device).unbind()

    @property
    def k_cache(self) -> torch.Tensor:
        return self._caches[self._cache_index][0]  # (L, R, H, max_len, hd)

    @property
    def v_cache(self) -> torch.Tensor:
        return self._caches[self._cache_index][1]  # (L, R, H, max_len, hd)

    @property
    def _cache_index(self) -> int:
        return 0 if self._sources is not None else self.current  # indirect: the one cache never moves

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        R, S, E = x.shape
        return x.view(R, S, self.n_head, self.head_dim).transpose(1, 2)  # (R, H, S, hd)

    def _mlp(self, block, x: torch.Tensor) -> torch.Tensor:
        return block.mlp.c_proj(self.act(block.mlp.c_fc(x)))  # (eval: no dropout)

    @staticmethod
    def _merge_heads(attn: torch.Tensor) -> torch.Tensor:
        R, H, S, hd = attn.shape
        return attn.transpose(1, 2).reshape(R, S, H * hd)  # (R, S, E)

    def _attention_out(self, block, attn: torch.Tensor) -> torch.Tensor:
        return block.attn.c_proj(self._merge_heads(attn))  # (R, S, E)

    def _block_tail(self, block, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = h + self._attention_out(block, attn)
        return h + self._mlp(block, block.ln_2(h))

    def _attend_one_query(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                          position: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(hd) + bias) v for q (R, H, 1, hd) over the cache k, v (R, H, max_len, hd); bias
        (1, 1, 1, max_len) masks the positions after `position` (a one-element device tensor)."""
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if self.attention == "indirect":
            return self._beam_attention(q, k, v, self._sources[self.current], position, self.scale)
        # q scaled first: a new, contiguous q that the batched matmul takes without a copy (exact for hd = 4^n)
        scores = torch.matmul(q * self.scale, k.transpose(-1, -2)).add_(bias)  # (R, H, 1, max_len)
        # as SDPA, the softmax in fp32 (asking for fp32 of an fp32 tensor would cost a copy)
        if scores.dtype == torch.float32:
            probs = scores.softmax(-1)
        else:
            probs = scores.softmax(-1, dtype=torch.float32).to(v.dtype)
        return torch.matmul(probs, v)  # (R, H, 1, hd)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.gpt2.lm_head(self.gpt2.transformer.ln_f(h))

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, repeats: int) -> torch.Tensor:
        """embeds (B, P, E) at positions 0..P-1; cache rows b*repeats .. b*repeats+repeats-1 get item b's keys
        and values (computed once per item, shared by its beams), in the first cache, which becomes current.
        Returns last-position logits (B, V)."""
        B, P, _ = embeds.shape
        self.current = 0
        if self._sources is not None:  # every row reads its own slots until a reorder says otherwise
            self._sources[0].copy_(self.row_ids.expand_as(self._sources[0]))
        t = self.gpt2.transformer
        h = embeds + t.wpe(self.positions[:P])  # (B, P, E)
        for layer, block in enumerate(t.h):
            q, k, v = block.attn.c_attn(block.ln_1(h)).split(h.shape[-1], dim=2)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, H, P, hd)
            self.k_cache[layer, :, :, :P] = k.repeat_interleave(repeats, dim=0)
            self.v_cache[layer, :, :, :P] = v.repeat_interleave(repeats, dim=0)
            h = self._block_tail(block, h, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self._logits(h[:, -1, :])

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, position: torch.Tensor, *, head: bool = True) -> torch.Tensor:
        """input_ids (R,) at `position` (a 0-d device tensor) -> logits (R, V); writes keys/values at position.
        head=False: the last layer's output (R, E) instead, before ln_f (for ldlm.kernels.beam_head, which
        applies ln_f and the LM head itself)."""
        t = self.gpt2.transformer
        h = (t.wte(input_ids) + t.wpe(position))[:, None, :]  # (R, 1, E)
        # the mask as the additive bias SDPA would make of a boolean one, once for all layers instead of per layer
        # (the indirect kernel masks by the position itself)
        bias = None if self._sources is not None else (
            torch.where(self.positions <= position, *self._mask_values)[None, None, None, :])  # (1, 1, 1, max_len)
        index = position.view(1)
        if self._sources is not None:  # this step's key and value go to each row's own slot
            self._sources[self.current].index_copy_(1, index, self.row_ids)
        if self.fused_blocks:
            return self._fused_step(h, bias, index, head)
        x = t.h[0].ln_1(h)
        for layer, (block, next_norm) in enumerate(zip(t.h, self.following_norms)):
            q, k, v = block.attn.c_attn(x).split(h.shape[-1], dim=2)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (R, H, 1, hd)
            self.k_cache[layer].index_copy_(2, index, k)
            self.v_cache[layer].index_copy_(2, index, v)
            attn = self._attend_one_query(q, self.k_cache[layer], self.v_cache[layer], bias, index)
            h, x = self.add_norm(h, self._attention_out(block, attn), block.ln_2)
            h, x = self.add_norm(h, self._mlp(block, x), next_norm)
        return self.gpt2.lm_head(x[:, 0, :]) if head else h[:, 0, :]  # x: ln_f(h)

    def _fused_step(self, h: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor,
                    head: bool) -> torch.Tensor:
        """step()'s layers and LM head on h (R, 1, E), every layer's matmul one fused_linear launch: per layer
        LN1 -> QKV, the cache write and attention, output projection -> + residual, LN2 -> up -> GELU, down ->
        + residual; then LN_f and the LM head. Returns logits (R, V), or with head=False the last layer's output
        (R, E). The layers' own forward hooks do not run."""
        t, linear = self.gpt2.transformer, self.linear
        for layer, block in enumerate(t.h):
            q, k, v = linear(h, block.attn.c_attn, norm=block.ln_1).split(h.shape[-1], dim=2)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (R, H, 1, hd)
            self.k_cache[layer].index_copy_(2, index, k)
            self.v_cache[layer].index_copy_(2, index, v)
            attn = self._attend_one_query(q, self.k_cache[layer], self.v_cache[layer], bias, index)
            h = linear(self._merge_heads(attn), block.attn.c_proj, residual=h)
            up = linear(h, block.mlp.c_fc, norm=block.ln_2, gelu="tanh")
            h = linear(up, block.mlp.c_proj, residual=h)
        # the LM head as its module: it is what ldlm.sampling.beam_search and Hugging Face call (hooks included); the
        # fused beam step (head=False) takes it whole (LM head, log-softmax, top-k), not as one more linear
        return self.gpt2.lm_head(t.ln_f(h[:, 0, :])) if head else h[:, 0, :]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row r of the cache becomes old row rows[r] (beam reordering), on the device: all layers' keys and
        values gathered into the other cache in two kernels, then that cache is current. Captured in a CUDA
        graph, each of the two directions is its own graph (StaticBeamSearch replays them alternately). It
        moves the full static length every token; with attention="indirect" it gathers the (R, max_len) table
        of source rows instead, and the cache stays where it is. The gather copies bits as 8-byte words: it
        moves elements, and a quarter as many bf16 ones run faster (on the H200 a bf16 cache gathered at
        1.3 TB/s, an fp32 one at 2.4)."""
        if self._sources is not None:
            torch.index_select(self._sources[self.current], 0, rows, out=self._sources[1 - self.current])
        else:
            for source, target in zip(self._caches[self.current], self._caches[1 - self.current]):
                torch.index_select(_as_words(source), 1, rows, out=_as_words(target))
        self.current = 1 - self.current
