"""The reverse transformer: (x_t, t) -> x0_hat, one readable file (nanoGPT style)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of continuous t (Vaswani et al. 2017; as in DDPM). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, K, C = x.shape  # K latent tokens
        if K == 1 and not (self.training and self.dropout > 0):
            # One token attends only to itself: the softmax over a single key is exactly 1, so attention returns
            # its value. Skipping the query and key projections and the attention kernels is exact, and saves a
            # sixth of each block's weights and FLOPs (the design's one mean-pooled latent).
            return self.proj(F.linear(x, self.qkv.weight[2 * C :], self.qkv.bias[2 * C :]))  # (B, 1, C)
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, K, C)
        q, k, v = (z.view(B, K, self.n_heads, C // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, H, K, C/H)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, K, C))


class Block(nn.Module):
    """Pre-norm transformer encoder layer (bidirectional attention over the latent tokens)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.mlp_ratio * config.d_model),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * config.d_model, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ReverseTransformer(nn.Module):
    """Predicts the clean (normalized) latent from a noisy one.

    Input: [x_t ; sinusoidal(t)] per latent token, projected to d_model (plus a learned position embedding
    per token when there are K > 1); `n_layers` pre-norm encoder blocks; a final LayerNorm and a projection
    back to the latent size.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inputs = config.latent_dim * (2 if config.self_condition else 1) + config.time_embed_dim
        self.in_proj = nn.Linear(inputs, config.d_model)
        if config.latent_tokens > 1:  # tell the K latent tokens apart (the resampler's queries are ordered)
            self.pos_emb = nn.Parameter(0.02 * torch.randn(config.latent_tokens, config.d_model))  # (K, d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.latent_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, x0_prev: torch.Tensor | None = None) -> torch.Tensor:
        """x_t: (B, D), or (B, K, D) with config.latent_tokens = K > 1; t: (B,) continuous timestep in [0, T);
        x0_prev: the previous x0 estimate, x_t's shape, used only with config.self_condition (None: zeros).
        Returns x_t's shape."""
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
        for block in self.blocks:
            h = block(h)
        out = self.out_proj(self.ln_f(h))  # (B, K, D)
        return out[:, 0, :] if single else out


def self_conditioned(model: ReverseTransformer):
    """A denoiser (x_t, t) -> x0_hat for the samplers: feeds each estimate back as the next step's x0_prev
    when the model is self-conditioned (one fresh state per sampling run); the model itself otherwise."""
    if not model.config.self_condition:
        return model
    previous = None

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal previous
        previous = model(x_t, t, previous)
        return previous

    return denoise
