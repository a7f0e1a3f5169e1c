"""The reverse transformer: (x_t, t[, condition]) -> x0_hat, one readable file (nanoGPT style)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldlm.model.config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous t (Vaswani et al. 2017; as in DDPM). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


@dataclass
class Condition:
    """What a batch is generated from, as the blocks read it: d_model-wide tokens and which of them are real.
    A text gives its encoder token states (projected), a label one embedding, the null condition one learned
    token (classifier-free guidance's unconditional branch)."""

    tokens: torch.Tensor  # (B, L, d_model); projected: (B, L, n_layers * 2 * d_model)
    mask: torch.Tensor  # (B, L) bool, True for a real token; every row has at least one
    # True: `tokens` holds each cross-attention block's keys and values of the tokens, side by side
    # (ReverseTransformer.project_condition): what the blocks read of a condition, made once per sampling run
    projected: bool = False

    def padded(self, length: int) -> Condition:
        """The same condition with L grown to `length` by masked zero tokens."""
        extra = length - self.tokens.shape[1]
        if extra <= 0:
            return self
        return Condition(F.pad(self.tokens, (0, 0, 0, extra)), F.pad(self.mask, (0, extra), value=False),
                         self.projected)

    @staticmethod
    def cat(parts: list[Condition]) -> Condition:
        """Rows of several conditions, padded to the longest: (sum B, max L, width)."""
        if len({p.projected for p in parts}) > 1:
            raise ValueError("cannot batch projected and unprojected conditions together: project every part "
                             "(ReverseTransformer.project_condition) or none")
        length = max(p.tokens.shape[1] for p in parts)
        first, dtype = parts[0], functools.reduce(torch.promote_types, [p.tokens.dtype for p in parts])
        # each element written once (padding the parts first, then concatenating, writes them twice: a projected
        # condition is 2 x n_layers times the tokens' width, and the serving loop batches its rows each iteration)
        tokens = first.tokens.new_empty(sum(p.tokens.shape[0] for p in parts), length, first.tokens.shape[2],
                                        dtype=dtype)
        mask = first.mask.new_zeros(tokens.shape[:2])
        row = 0
        for p in parts:
            rows, real = p.tokens.shape[:2]
            tokens[row : row + rows, :real] = p.tokens
            tokens[row : row + rows, real:] = 0
            mask[row : row + rows, :real] = p.mask
            row += rows
        return Condition(tokens, mask, first.projected)

    def rows(self, index) -> Condition:
        return Condition(self.tokens[index], self.mask[index], self.projected)

    def trimmed(self) -> Condition:
        """The same condition without the trailing padding no row reads (rows taken from a longer batch)."""
        used = int(self.mask.any(0).nonzero().max()) + 1  # every row has a real token
        if used == self.tokens.shape[1]:
            return self
        return Condition(self.tokens[:, :used], self.mask[:, :used], self.projected)

    @staticmethod
    def repeated(token: torch.Tensor, batch: int, projected: bool = False) -> Condition:
        """One token (1, width) as the condition of `batch` rows (the null condition; projected: its keys and
        values)."""
        tokens = token[None].expand(batch, -1, -1)  # (B, 1, width)
        return Condition(tokens, torch.ones(batch, 1, dtype=torch.bool, device=tokens.device), projected)


def _key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) bool, True for keys to attend to -> SDPA's (B, 1, 1, N) boolean attn_mask."""
    return None if mask is None else mask[:, None, None, :]


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C) -> (B, N, C); mask (B, N) bool marks the keys to attend to (None: all)."""
        _, K, C = x.shape  # K latent tokens (and, with joint conditioning, the condition's tokens)
        if K == 1 and not (self.training and self.dropout > 0):
            # One token attends only to itself: the softmax over a single key is exactly 1, so attention returns
            # its value. Skipping the query and key projections and the attention kernels is exact, and saves a
            # sixth of each block's weights and FLOPs (the design's one mean-pooled latent).
            return self.proj(F.linear(x, self.qkv.weight[2 * C :], self.qkv.bias[2 * C :]))  # (B, 1, C)
        return self.proj(self.mix(self.qkv(x), mask))

    def mix(self, qkv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The query, key and value projections qkv (B, K, 3C) -> the heads' attention (B, K, C), before the output
        projection (the engine's fused blocks make the projections themselves)."""
        B, K, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(C, dim=2)  # 3 x (B, K, C)
        q, k, v = (z.view(B, K, self.n_heads, C // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, H, K, C/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_key_mask(mask),
                                           dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(B, K, C)


class CrossAttention(nn.Module):
    """The latent tokens attend to the condition's tokens (LD4LG's seq2seq reverse network)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.q = nn.Linear(config.d_model, config.d_model)
        self.kv = nn.Linear(config.d_model, 2 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition tokens (B, L, C) -> keys and values, each (B, H, L, C/H). They do not depend on x_t, so the
        engine's sampling loop computes them once per run (ldlm.fast.folded_reverse)."""
        return self.heads(self.kv(tokens))

    def heads(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The kv projection's output (B, L, 2C) -> keys and values, each (B, H, L, C/H)."""
        B, L, C, H = kv.shape[0], kv.shape[1], kv.shape[2] // 2, self.n_heads
        k, v = (z.reshape(B, L, H, C // H).transpose(1, 2) for z in kv.split(C, dim=2))
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, [K,] C) against keys and values (B, H, L, C/H) with key mask (B, L) -> x's shape."""
        return self.proj(self.mix(self.q(x), k, v, mask))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The query projection q (B, [K,] C) against keys and values (B, H, L, C/H) -> the heads' attention, q's
        shape, before the output projection."""
        B, C, H = q.shape[0], q.shape[-1], self.n_heads
        heads = q.view(B, -1, H, C // H).transpose(1, 2)  # (B, H, K, C/H)
        y = F.scaled_dot_product_attention(heads, k, v, attn_mask=_key_mask(mask),
                                           dropout_p=self.dropout if self.training else 0.0)
        return y.transpose(1, 2).reshape(q.shape)

    def forward(self, x: torch.Tensor, condition: Condition, kv: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, K, C), condition tokens (B, L, C) -> (B, K, C); kv: this block's keys and values of the condition
        (B, L, 2C), projected beforehand (None: projected here)."""
        kv = self.kv(condition.tokens) if kv is None else kv
        return self.attend(x, *self.heads(kv), condition.mask)


class Block(nn.Module):
    """Pre-norm transformer encoder layer (bidirectional attention over the latent tokens), with a
    cross-attention to the condition after the self-attention when `cross` (condition_attention "cross")."""

    def __init__(self, config: ModelConfig, cross: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        if cross:
            self.ln_cross = nn.LayerNorm(config.d_model)
            self.cross = CrossAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.mlp_ratio * config.d_model),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * config.d_model, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, condition: Condition | None = None,
                condition_kv: torch.Tensor | None = None) -> torch.Tensor:
        """condition_kv: this block's share of a projected condition (B, L, 2 d_model), or None."""
        x = x + self.attn(self.ln_1(x), mask)
        if condition is not None:
            x = x + self.cross(self.ln_cross(x), condition, condition_kv)
        return x + self.mlp(self.ln_2(x))


class ReverseTransformer(nn.Module):
    """Predicts the clean (normalized) latent from a noisy one.

    Input: [x_t ; sinusoidal(t)] per latent token, projected to d_model (plus a learned position embedding
    per token when there are K > 1); `n_layers` pre-norm encoder blocks; a final LayerNorm and a projection
    back to the latent size.

    A conditional model (config.condition) reads a Condition (embed_condition): each block cross-attends to
    it, or ("joint") its tokens join the latent tokens in every block's self-attention. Without one it reads
    the learned null condition, so one model is conditional and unconditional (classifier-free guidance).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inputs = config.latent_dim * (2 if config.self_condition else 1) + config.time_embed_dim
        self.in_proj = nn.Linear(inputs, config.d_model)
        if config.latent_tokens > 1:  # tell the K latent tokens apart (the resampler's queries are ordered)
            self.pos_emb = nn.Parameter(0.02 * torch.randn(config.latent_tokens, config.d_model))  # (K, d_model)
        cross = config.condition is not None and config.condition_attention == "cross"
        self.blocks = nn.ModuleList(Block(config, cross) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.latent_dim)
        if config.condition == "label":
            if not config.labels:
                raise ValueError("a label-conditioned model needs its label set (ModelConfig.labels); training reads "
                                 "it from the data")
            self.condition_embed = nn.Embedding(len(config.labels), config.d_model)
        elif config.condition == "text":  # the frozen encoder's token states (latent_dim wide) -> d_model
            self.condition_embed = nn.Sequential(nn.LayerNorm(config.latent_dim),
                                                 nn.Linear(config.latent_dim, config.d_model))
        if config.condition is not None:
            self.null_condition = nn.Parameter(0.02 * torch.randn(1, config.d_model))  # one token (1, d_model)

    def embed_condition(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> Condition:
        """A batch's condition: label ids (B,), or a source text's encoder token states (B, L, latent_dim) with
        their attention mask (B, L)."""
        if self.config.condition == "label":
            ones = torch.ones(states.shape[0], 1, dtype=torch.bool, device=states.device)
            return Condition(self.condition_embed(states)[:, None, :], ones)  # one token each
        if self.config.condition != "text":
            raise ValueError("this reverse transformer is unconditional: it takes no condition")
        tokens = self.condition_embed(states.to(self.condition_embed[1].weight.dtype))
        return Condition(tokens, mask.bool() if mask is not None else torch.ones(states.shape[:2], dtype=torch.bool,
                                                                                 device=states.device))

    def null(self, batch: int) -> Condition:
        """The null condition for `batch` rows: one learned token each."""
        return Condition.repeated(self.null_condition, batch)

    def project_condition(self, condition: Condition) -> Condition:
        """`condition` as a cross-attention model's blocks read it: each block's keys and values of its tokens,
        side by side (B, L, n_layers * 2 * d_model). They do not depend on x_t or t, so a sampling loop projects
        its condition once instead of at every step (every block's kv projection over L tokens: on E2E's source
        texts most of a guided step's work). A projected condition gives forward the same result."""
        if self.config.condition is None or self.config.condition_attention != "cross":
            raise ValueError("only a model that reads its condition by cross-attention takes a projected condition "
                             f"(this one's condition is {self.config.condition!r}, read by "
                             f"{self.config.condition_attention!r} attention)")
        if condition.projected:
            return condition
        tokens = condition.tokens.to(self.null_condition.dtype)
        return Condition(torch.cat([block.cross.kv(tokens) for block in self.blocks], dim=-1), condition.mask, True)

    def drop(self, condition: Condition, dropped: torch.Tensor) -> Condition:
        """Rows where `dropped` (B,) bool is True replaced by the null condition (condition dropout)."""
        null = self.null(condition.tokens.shape[0]).padded(condition.tokens.shape[1])
        return Condition(torch.where(dropped[:, None, None], null.tokens.to(condition.tokens.dtype), condition.tokens),
                         torch.where(dropped[:, None], null.mask, condition.mask))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, x0_prev: torch.Tensor | None = None,
                condition: Condition | None = None) -> torch.Tensor:
        """x_t: (B, D), or (B, K, D) with config.latent_tokens = K > 1; t: (B,) continuous timestep in [0, T);
        x0_prev: the previous x0 estimate, x_t's shape, used only with config.self_condition (None: zeros);
        condition: what a conditional model generates from (None: the null condition). Returns x_t's shape."""
        single = x_t.dim() == 2
        x = x_t[:, None, :] if single else x_t  # (B, K, D)
        temb = timestep_embedding(t, self.config.time_embed_dim).to(x.dtype)  # (B, E)
        temb = temb[:, None, :].expand(-1, x.shape[1], -1)  # (B, K, E)
        parts = [x]
        if self.config.self_condition:
            prev = torch.zeros_like(x) if x0_prev is None else (x0_prev[:, None, :] if single else x0_prev)
            parts.append(prev)  # (B, K, D)
        h = self.in_proj(torch.cat([*parts, temb], dim=-1))  # (B, K, d_model)
        if self.config.latent_tokens > 1:
            h = h + self.pos_emb.to(h.dtype)
        if self.config.condition is None:
            if condition is not None:
                raise ValueError("this reverse transformer is unconditional: it takes no condition")
            for block in self.blocks:
                h = block(h)
        else:
            condition = condition if condition is not None else self.null(h.shape[0])
            condition = Condition(condition.tokens.to(h.dtype), condition.mask, condition.projected)
            h = self._conditioned(h, condition)
        out = self.out_proj(self.ln_f(h))  # (B, K, D)
        return out[:, 0, :] if single else out

    def _conditioned(self, h: torch.Tensor, condition: Condition) -> torch.Tensor:
        """The blocks on latent tokens h (B, K, d_model) reading `condition`."""
        if self.config.condition_attention == "cross":
            shares = (condition.tokens.chunk(len(self.blocks), dim=-1) if condition.projected
                      else (None,) * len(self.blocks))  # each block's (B, L, 2 d_model)
            for block, kv in zip(self.blocks, shares):
                h = block(h, condition=condition, condition_kv=kv)
            return h
        if condition.projected:
            raise ValueError("a joint-attention model reads its condition's tokens, not a projected condition")
        K = h.shape[1]  # joint: the condition's tokens join the sequence; the latent tokens are read back
        seq = torch.cat([h, condition.tokens], dim=1)  # (B, K + L, d_model)
        mask = torch.cat([condition.mask.new_ones(h.shape[0], K), condition.mask], dim=1)  # (B, K + L)
        for block in self.blocks:
            seq = block(seq, mask)
        return seq[:, :K]
