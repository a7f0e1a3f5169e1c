"""The beam-indirect one-query attention kernel against torch on irregular shapes (Triton's interpreter on CPU,
compiled on a GPU): the cache gathered through the source table, then masked attention.

Tolerances: fp32 2e-6 absolute and relative (the softmax summed blockwise, online); bf16 and fp16 one rounding
of the output apart: rtol 1.6e-2 / 2e-3, from inputs stored in that dtype and math in fp32 on both sides.
"""

from __future__ import annotations

import pytest
import torch

from ldlm.kernels.beam_attention import beam_attention, beam_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


def inputs(rows, heads, max_len, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, 1, 3 * heads * head_dim, generator=g)  # q as the model makes it: a strided view
    q = qkv[..., : heads * head_dim].view(rows, 1, heads, head_dim).transpose(1, 2)
    k, v = (torch.randn(rows, heads, max_len, head_dim, generator=g) for _ in "kv")
    source = torch.randint(0, rows, (rows, max_len), generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)] + [source.to(DEVICE)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, heads, max_len, head_dim, block_p", [
    (1, 1, 1, 1, 32), (3, 2, 13, 16, 4), (7, 3, 72, 64, 32), (5, 12, 37, 8, 16)])
def test_matches_torch_through_the_source_table(rows, heads, max_len, head_dim, block_p, dtype):
    q, k, v, source = inputs(rows, heads, max_len, head_dim, dtype, seed=rows + max_len)
    for position in sorted({0, max_len // 2, max_len - 1}):
        at = torch.tensor([position], device=DEVICE)
        got = beam_attention(q, k, v, source, at, head_dim**-0.5, block_p=block_p)
        expected = beam_attention_reference(q, k, v, source, at, head_dim**-0.5)
        assert got.shape == (rows, heads, 1, head_dim) and got.dtype == dtype
        assert got.transpose(1, 2).is_contiguous()  # (R, 1, H, hd) in memory: the heads merge without a copy
        rtol, atol = TOLERANCE[dtype]
        torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)


def test_reads_nothing_after_the_position():
    """Keys and values after the current position are neither counted nor read: NaN there changes nothing."""
    q, k, v, source = inputs(4, 2, 9, 16, torch.float32)
    at = torch.tensor([5], device=DEVICE)
    expected = beam_attention(q, k, v, source, at, 0.25)
    k[:, :, 6:], v[:, :, 6:] = float("nan"), float("nan")
    torch.testing.assert_close(beam_attention(q, k, v, source, at, 0.25), expected, rtol=0, atol=0)


def test_bad_inputs_say_what_to_pass():
    q, k, v, source = inputs(2, 2, 5, 16, torch.float32)
    at = torch.tensor([1], device=DEVICE)
    with pytest.raises(ValueError, match="source must be int64 \\(2, 5\\)"):
        beam_attention(q, k, v, source.int(), at, 1.0)
    with pytest.raises(ValueError, match="must be \\(R, H, max_len, hd\\)"):
        beam_attention(q, k[:1], v[:1], source, at, 1.0)
    with pytest.raises(ValueError, match="one query per row"):
        beam_attention(torch.cat([q, q], 2), k, v, source, at, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        beam_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, source, at, 1.0)
    q12, k12, v12, s12 = inputs(2, 2, 5, 12, torch.float32)
    with pytest.raises(ValueError, match="head_dim must be a power of 2"):
        beam_attention(q12, k12, v12, s12, at, 1.0)
