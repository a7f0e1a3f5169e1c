"""K latent tokens from the frozen encoder's token states: a Perceiver resampler (Jaegle et al. 2021, as in
Flamingo, Alayrac et al. 2022; LD4LG, Lovelace et al. 2023, compresses text this way for latent diffusion).

K learned queries attend over [token states ; queries] (padding masked, so a text's latent never depends on its
batch), then an MLP, for `resampler_layers` pre-norm layers. Trained with the decoder (reconstruction loss) while
the encoder stays frozen. Used only when ModelConfig.latent_tokens > 1; with K = 1 the latent is the masked mean.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldlm.model.config import ModelConfig


class ResamplerLayer(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_states = nn.LayerNorm(dim)
        self.ln_queries = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """queries (B, K, D), states (B, L, D), keep (B, L+K) bool: which keys are real -> (B, K, D)."""
        B, K, D = queries.shape
        h = self.ln_queries(queries)
        context = torch.cat([self.ln_states(states), h], dim=1)  # (B, L+K, D)
        q = self.q(h).view(B, K, self.heads, D // self.heads).transpose(1, 2)  # (B, H, K, D/H)
        k, v = (z.view(B, -1, self.heads, D // self.heads).transpose(1, 2)
                for z in self.kv(context).split(D, dim=2))  # 2 x (B, H, L+K, D/H)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # (B, H, K, D/H)
        queries = queries + self.proj(y.transpose(1, 2).reshape(B, K, D))
        return queries + self.mlp(self.ln_mlp(queries))


class LatentResampler(nn.Module):
    """Token states (B, L, D) and their attention mask (B, L) -> K latent tokens (B, K, D)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.queries = nn.Parameter(0.02 * torch.randn(config.latent_tokens, config.latent_dim))  # (K, D)
        self.layers = nn.ModuleList(ResamplerLayer(config.latent_dim, config.resampler_heads)
                                    for _ in range(config.resampler_layers))
        self.ln_out = nn.LayerNorm(config.latent_dim)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B = states.shape[0]
        queries = self.queries.to(states.dtype)[None].expand(B, -1, -1)  # (B, K, D)
        keep = torch.cat([attention_mask.bool(), attention_mask.new_ones(B, queries.shape[1]).bool()], dim=1)
        for layer in self.layers:
            queries = layer(queries, states, keep)
        return self.ln_out(queries)
