"""The exported graphs as small modules with plain-tensor inputs and outputs: encoder, reverse transformer,
decoder prefill and step, and for a conditional model the condition embedding (and for one that reads it by
cross-attention, the condition's projection to each block's keys and values).

The prefill's cache comes out as one stacked tensor, (layers, 2, rows, heads, length, head_dim) with keys at
index 0 and values at 1; the step graph reads a static cache, one key and one value tensor per layer, and
returns only the new token's keys and values, so a runtime needs no Hugging Face cache class and no step
copies the cache. The decoder graphs re-state GPT-2's forward pass (as ldlm.fast.static_gpt2 does) over the loaded
model's own weights; tests check them against the module.
Every graph computes in its weights' dtype and takes and returns float32 (but the step graph's cache, kept in
the weights' dtype so that reading it costs no conversion), so fp32 and fp16 variants share one interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldlm.fast.static_gpt2 import check_supported
from ldlm.model.decoder import LatentDecoder
from ldlm.model.encoder import LatentEncoder, masked_mean
from ldlm.model.reverse import Condition, ReverseTransformer


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class EncoderGraph(nn.Module):
    """(input_ids (B, L) int64, attention_mask (B, L) int64) -> latent (B, *latent_shape) float32: the masked
    mean (B, D), or the resampler's K latent tokens (B, K, D); with token_states (a text-conditioned model,
    whose sources it also encodes), also the last hidden states (B, L, D) float32."""

    def __init__(self, encoder: LatentEncoder, token_states: bool = False):
        super().__init__()
        self.model = encoder.model
        self.resampler = encoder.resampler
        self.token_states = token_states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        if self.resampler is None:
            latent = masked_mean(hidden.float(), attention_mask)
        else:
            latent = self.resampler(hidden, attention_mask).float()
        return (latent, hidden.float()) if self.token_states else latent


class ReverseGraph(nn.Module):
    """(x_t (B, *latent_shape), t (B,) float32 [, x0_prev like x_t] [, a conditional model's Condition: the
    condition's tokens, or for a cross-attention model its projection (ConditionKeysValuesGraph), (B, L, width)
    float32, and condition_mask (B, L) int64]) -> x0_hat like x_t, float32."""

    def __init__(self, reverse: ReverseTransformer):
        super().__init__()
        self.reverse = reverse
        self.self_condition = reverse.config.self_condition
        self.conditional = reverse.config.condition is not None
        self.projected = reads_projection(reverse)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        dtype = _dtype(self.reverse)
        prev = extra[0].to(dtype) if self.self_condition else None
        condition = None
        if self.conditional:
            tokens, mask = extra[-2:]
            condition = Condition(tokens.to(dtype), mask.bool(), self.projected)
        return self.reverse(x_t.to(dtype), t, prev, condition).float()


def reads_projection(reverse: ReverseTransformer) -> bool:
    """Whether the exported reverse graph reads its condition projected (a cross-attention model) rather than
    as tokens: the keys and values are then projected once per sampling run, not at every step."""
    return reverse.config.condition is not None and reverse.config.condition_attention == "cross"


class ConditionGraph(nn.Module):
    """A conditional model's condition embedding: a text's encoder token states (B, L, D) float32, or label ids
    (B,) int64 -> condition tokens (B, L or 1, d_model) float32 (the mask is the caller's: all ones for labels)."""

    def __init__(self, reverse: ReverseTransformer):
        super().__init__()
        self.reverse = reverse

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.reverse.embed_condition(states).tokens.float()


class ConditionKeysValuesGraph(nn.Module):
    """A cross-attention model's condition as its blocks read it (ReverseTransformer.project_condition): condition
    tokens (B, L, d_model) float32 -> each block's keys and values side by side (B, L, n_layers * 2 * d_model)
    float32, run once per sampling run; the reverse graph reads them at every step."""

    def __init__(self, reverse: ReverseTransformer):
        super().__init__()
        self.reverse = reverse

    def forward(self, condition_tokens: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(condition_tokens.shape[:2], dtype=torch.bool, device=condition_tokens.device)
        tokens = condition_tokens.to(_dtype(self.reverse))
        return self.reverse.project_condition(Condition(tokens, mask)).tokens.float()


class _GPT2Graph(nn.Module):
    def __init__(self, decoder: LatentDecoder):
        super().__init__()
        check_supported(decoder.gpt2)
        self.gpt2 = decoder.gpt2
        cfg = decoder.gpt2.config
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        R, S, _ = x.shape
        return x.view(R, S, self.n_head, self.head_dim).transpose(1, 2)  # (R, H, S, hd)

    def _layers(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal self-attention over h (R, S, E) -> (last hidden (R, S, E), present (L, 2, R, H, S, hd))."""
        presents = []
        for block in self.gpt2.transformer.h:
            q, k, v = block.attn.c_attn(block.ln_1(h)).split(h.shape[-1], dim=2)
            q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (R, H, S, hd)
            presents.append(torch.stack([k, v]))  # (2, R, H, S, hd)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (R, H, S, hd)
            R, H, S, hd = attn.shape
            h = h + block.attn.c_proj(attn.transpose(1, 2).reshape(R, S, H * hd))
            h = h + block.mlp(block.ln_2(h))
        return h, torch.stack(presents).float()

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.gpt2.lm_head(self.gpt2.transformer.ln_f(h)).float()


class DecoderPrefillGraph(_GPT2Graph):
    """latent (B, *latent_shape) float32 -> (logits of the next token (B, V), present (L, 2, B, H, P, hd)) for the
    prefix."""

    def __init__(self, decoder: LatentDecoder):
        super().__init__(decoder)
        self.prefix_proj = decoder.prefix_proj
        self.n_prefix = decoder.config.n_prefix

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = latent.shape[0]
        embeds = self.prefix_proj(latent.to(_dtype(self.gpt2))).view(B, self.n_prefix, -1)  # (B, P, E)
        positions = torch.arange(self.n_prefix, device=latent.device)
        h, present = self._layers(embeds + self.gpt2.transformer.wpe(positions))
        return self._logits(h[:, -1, :]), present


class DecoderStepGraph(_GPT2Graph):
    """One token per row on top of a static cache that the graph only reads.

    input_ids (R, 1) int64, position_ids (R, 1) int64, past_mask (R, C) int64 (1: a filled cache slot),
    then per layer past_key_l (R, H, hd, C) (keys stored transposed, ready for q @ k) and past_value_l
    (R, H, C, hd), in the cache dtype (the weights' dtype) -> logits (R, V) float32 and the new token's
    new_kv (L, 2, R, H, hd) in the cache dtype, which the runtime writes into slot S of its cache.

    Attention is split into the past part (read in place: no concatenation copies the cache) and the new
    token's own key and value; one softmax spans both. C is the cache's capacity, at least the filled length.
    """

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, past_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One query a row, so the hidden states stay 2-D, (R, E), and every projection is one Gemm on GPT-2's
        # Conv1D weights (in, out), with reshapes to constant shapes only: Conv1D's own flatten-and-restore and
        # the (R, 1, E) form exported 195 ONNX nodes a step against 133 here, and the step is bound by node count
        # at a few rows (bench/RESULTS.md, "the decoder step as a leaner graph").
        t = self.gpt2.transformer
        H, hd = self.n_head, self.head_dim
        E = H * hd
        h = t.wte(input_ids.reshape(-1)) + t.wpe(position_ids.reshape(-1))  # (R, E)
        hidden_mask = ((1 - past_mask.to(h.dtype)) * torch.finfo(h.dtype).min)[:, None, None, :]  # (R, 1, 1, C)
        new_kv = []
        for layer, block in enumerate(t.h):
            past_key, past_value = past[2 * layer], past[2 * layer + 1]  # (R, H, hd, C), (R, H, C, hd)
            qkv = _conv1d(block.attn.c_attn, block.ln_1(h))  # (R, 3E)
            q, k, v = qkv.split(E, dim=1)
            q = (q * hd ** -0.5).reshape(-1, H, 1, hd)  # scaled once, before both score terms
            k, v = k.reshape(-1, H, 1, hd), v.reshape(-1, H, 1, hd)
            scores = torch.cat([q @ past_key + hidden_mask,  # (R, H, 1, C)
                                (q * k).sum(-1, keepdim=True)], dim=-1)  # (R, H, 1, C + 1)
            probs = torch.softmax(scores.float(), dim=-1).to(h.dtype)
            attn = probs[..., :-1] @ past_value + probs[..., -1:] * v  # (R, H, 1, hd)
            h = h + _conv1d(block.attn.c_proj, attn.reshape(-1, E))
            h = h + _conv1d(block.mlp.c_proj, block.mlp.act(_conv1d(block.mlp.c_fc, block.ln_2(h))))
            new_kv += [k.reshape(-1, H, hd), v.reshape(-1, H, hd)]
        return self._logits(h), torch.stack(new_kv).reshape(len(t.h), 2, -1, H, hd)  # (R, V), (L, 2, R, H, hd)


def _conv1d(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D (weight (in, out)) on 2-D x (R, in) as one Gemm."""
    return torch.addmm(layer.bias, x, layer.weight)
