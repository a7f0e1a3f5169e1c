"""The reverse transformer: shapes, the time embedding, and that it is a function of t."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldlm.model.config import ModelConfig
from ldlm.model.reverse import ReverseTransformer, SelfAttention, timestep_embedding


def test_shapes_for_one_and_several_latent_tokens():
    config = ModelConfig.from_preset("tiny")
    model = ReverseTransformer(config).eval()
    t = torch.tensor([0.0, 500.5, 999.0])
    assert model(torch.randn(3, config.latent_dim), t).shape == (3, config.latent_dim)
    assert model(torch.randn(3, 5, config.latent_dim), t).shape == (3, 5, config.latent_dim)


def test_design_sizes_of_the_base_preset():
    config = ModelConfig.from_preset("base")
    model = ReverseTransformer(config)
    assert model.in_proj.in_features == 768 + config.time_embed_dim and model.in_proj.out_features == 768
    assert len(model.blocks) == 4 and model.blocks[0].attn.n_heads == 8
    assert model.out_proj.out_features == 768


def test_timestep_embedding_is_continuous_and_bounded():
    emb = timestep_embedding(torch.tensor([10.0, 10.001, 900.0]), 64)
    assert emb.shape == (3, 64) and emb.abs().max() <= 1.0
    assert (emb[0] - emb[1]).abs().max() < 1e-2 < (emb[0] - emb[2]).abs().max()
    assert timestep_embedding(torch.tensor([1.0]), 33).shape == (1, 33)


def test_output_depends_on_t_and_batch_items_are_independent():
    config = ModelConfig.from_preset("tiny")
    model = ReverseTransformer(config).eval()
    x = torch.randn(4, config.latent_dim)
    out = model(x, torch.full((4,), 100.0))
    assert not torch.allclose(out, model(x, torch.full((4,), 900.0)))
    torch.testing.assert_close(model(x[1:2], torch.full((1,), 100.0)), out[1:2], rtol=1e-5, atol=1e-6)


def test_one_token_attention_is_its_value_projected():
    """With one latent token the block skips the query/key projections and the attention kernels; the result
    is the full computation's (softmax over a single key is exactly 1)."""
    config = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    attention = SelfAttention(config).eval()
    x = torch.randn(5, 1, config.d_model)
    B, K, C = x.shape
    q, k, v = (z.view(B, K, config.n_heads, C // config.n_heads).transpose(1, 2) for z in attention.qkv(x).split(C, 2))
    full = attention.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, K, C))
    torch.testing.assert_close(attention(x), full, rtol=1e-6, atol=1e-6)
    two = torch.randn(5, 2, config.d_model)  # several tokens take the attention path: they mix
    assert not torch.allclose(attention(two)[:, :1], attention(two[:, :1]))
