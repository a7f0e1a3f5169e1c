"""The fused linear kernel (layer norm prologue; bias, GELU and residual epilogue; split over K) against torch's
modules one after another, on irregular shapes (Triton interpreter on CPU, compiled on a GPU).

Tolerances: fp32 1e-5 relative to the output's largest value (IEEE fp32 products, summed in another order);
bf16 and fp16 against torch's same modules in that dtype: the kernel normalizes and sums in fp32 and rounds
once, torch rounds after each module, so they sit a few roundings apart: bf16 3e-2, fp16 4e-3 of the largest.
float8 weights (Fp8Linear) against the same function in torch (its dequantized weight), at the same tolerances:
the codes are exact in every activation dtype, only the place of the scale (after the sum) differs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldlm.kernels.fused_linear import (Fp8Linear, Tiles, default_tiles,  # conftest: TRITON_INTERPRET=1 on CPU
                                       fused_linear)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 40, 50), (3, 100, 77), (37, 64, 130), (2, 768, 96)]  # rows, K, N: none a multiple of the tiles
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def modules(K: int, N: int, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    linear, norm = torch.nn.Linear(K, N), torch.nn.LayerNorm(K)
    with torch.no_grad():
        for p in (*linear.parameters(), *norm.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * (K**-0.5 if p is linear.weight else 1.0))
    return linear.to(DEVICE, dtype), norm.to(DEVICE, dtype), g


def expected(x, linear, norm, gelu, residual):
    y = linear(norm(x) if norm is not None else x)
    y = F.gelu(y, approximate="tanh" if gelu == "tanh" else "none") if gelu else y
    return y + residual if residual is not None else y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# every shape in fp32; the half types on the two smaller (the interpreter's bf16 and fp16 are slow)
CASES = [(torch.float32, s) for s in SHAPES] + [(d, s) for d in (torch.bfloat16, torch.float16) for s in SHAPES[:2]]


@pytest.mark.parametrize(("dtype", "shape"), CASES)
def test_matches_torch_modules(shape, dtype):
    M, K, N = shape
    linear, norm, g = modules(K, N, sum(shape), dtype)
    x = (2 * torch.randn(M, K, generator=g) + 0.5).to(DEVICE, dtype)
    residual = torch.randn(M, N, generator=g).to(DEVICE, dtype)
    cases = 0
    with torch.no_grad():
        for use_norm in (False, True):
            for gelu in (False, True, "tanh"):
                for res in (None, residual):
                    for tiles in (None, Tiles(16, 32, 32), Tiles(16, 32, 32, split_k=3)):
                        if gelu and tiles is not None and tiles.split_k > 1:
                            continue
                        n = norm if use_norm else None
                        got = fused_linear(x, linear, norm=n, gelu=gelu, residual=res, tiles=tiles)
                        assert got.shape == (M, N) and got.dtype == dtype
                        err = rel_err(got, expected(x, linear, n, gelu, res))
                        assert err < TOLERANCE[dtype], (use_norm, gelu, res is not None, tiles, err)
                        cases += 1
    assert cases == 28  # norm x residual x (3 tilings without a GELU, 2 unsplit with each GELU)


def test_leading_dimensions_and_strided_rows():
    """(B, K, C) inputs, as the reverse transformer's latent tokens, and rows of a wider tensor (a view)."""
    linear, norm, g = modules(48, 24, 0, torch.float32)
    wide = torch.randn(2, 3, 80, generator=g).to(DEVICE)
    x = wide[..., :48]  # rows 80 apart
    residual = torch.randn(2, 3, 24, generator=g).to(DEVICE)
    with torch.no_grad():
        got = fused_linear(x.reshape(6, 48), linear, norm=norm, residual=residual.reshape(6, 24))
        assert rel_err(got, expected(x.reshape(6, 48), linear, norm, False, residual.reshape(6, 24))) < 1e-5
        got = fused_linear(x.contiguous(), linear, norm=norm, gelu=True)
        assert got.shape == (2, 3, 24) and rel_err(got, expected(x, linear, norm, True, None)) < 1e-5


def test_gpt2_conv1d_layout_and_a_linear_without_bias():
    """GPT-2's Conv1D stores its weight (K, N), the transpose of nn.Linear's; a tied LM head has no bias."""
    from transformers.pytorch_utils import Conv1D

    g = torch.Generator().manual_seed(3)
    conv = Conv1D(70, 48)  # nf = N = 70 outputs, nx = K = 48 inputs
    head = torch.nn.Linear(48, 90, bias=False)
    norm = torch.nn.LayerNorm(48)
    with torch.no_grad():
        for p in (*conv.parameters(), *head.parameters(), *norm.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    conv, head, norm = conv.to(DEVICE), head.to(DEVICE), norm.to(DEVICE)
    x = torch.randn(5, 1, 48, generator=g).to(DEVICE)  # GPT-2's one-token step: (rows, 1, E)
    with torch.no_grad():
        for module in (conv, head):
            got = fused_linear(x, module, norm=norm, gelu="tanh")
            assert rel_err(got, F.gelu(module(norm(x)), approximate="tanh")) < 1e-5, type(module).__name__


def test_default_tiles_split_small_grids_and_never_a_gelu():
    cuda, h200 = torch.device("cuda"), {"multiprocessors": 132, "gpu": "(untuned)"}  # the rule, not a stored table
    assert default_tiles(64, 768, 768, device=cuda, gelu=False, **h200).split_k > 1  # 12 programs on 132
    assert default_tiles(64, 3072, 768, device=cuda, gelu=True, **h200).split_k == 1
    assert default_tiles(4096, 3072, 768, device=cuda, gelu=False, **h200).split_k == 1  # the grid fills the GPU
    cpu = default_tiles(3, 100, 40, device=torch.device("cpu"), gelu=False)
    assert (cpu.block_m, cpu.split_k) == (16, 1)


def test_errors_say_what_to_fix():
    linear, norm, _ = modules(8, 4, 0, torch.float32)
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="last dimension is 7, the linear layer takes 8"):
        fused_linear(torch.zeros(2, 7, device=DEVICE), linear)
    with pytest.raises(ValueError, match="affine LayerNorm over the last dimension"):
        fused_linear(x, linear, norm=torch.nn.LayerNorm(4).to(DEVICE))
    with pytest.raises(ValueError, match=r"residual must be \(2, 4\)"):
        fused_linear(x, linear, residual=torch.zeros(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="share a dtype and device"):
        fused_linear(x.double(), linear)
    with pytest.raises(ValueError, match="split_k must be 1 with gelu"):
        fused_linear(x, linear, gelu=True, tiles=Tiles(16, 16, 16, split_k=2))
    with pytest.raises(ValueError, match="gelu must be one of"):
        fused_linear(x, linear, gelu="exact")
    with pytest.raises(TypeError, match="an nn.Linear, an Fp8Linear or a GPT-2 Conv1D"):
        fused_linear(x, torch.nn.Embedding(8, 4))


def test_fp8_codes_are_within_e4m3_rounding_of_the_weight():
    """Per output channel: the largest |w| maps to 448, every other weight to the nearest e4m3 value: within
    2^-4 relative (3 mantissa bits) for normal codes, within half the smallest subnormal step (2^-10) of the
    channel's scale below them; a Conv1D's weight quantized per output column, the same as its Linear twin."""
    from transformers.pytorch_utils import Conv1D

    linear, _, _ = modules(200, 33, 4, torch.float32)
    with torch.no_grad():
        linear.weight[3] *= 1e-3  # a channel of small weights keeps its relative precision
        linear.weight[5].zero_()  # an all-zero channel: a finite scale, zero codes
    fp8 = Fp8Linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.shape == (33, 200) and fp8.scale.shape == (33,)
    w, dq = linear.weight.float(), fp8.dequantized_weight().float()
    assert torch.equal(fp8.weight.float().abs().amax(dim=1)[[0, 3]], torch.tensor([448.0, 448.0], device=DEVICE))
    bound = 2**-4 * w.abs() + 2**-10 * fp8.scale[:, None]
    assert ((dq - w).abs() <= bound).all()
    assert (dq[5] == 0).all() and torch.isfinite(fp8.scale).all()
    assert ((dq - w).abs().amax(dim=1) / w.abs().amax(dim=1).clamp_min(1e-30))[3] < 2**-4
    conv = Conv1D(33, 200)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    twin = Fp8Linear(conv.to(DEVICE))
    assert torch.equal(twin.weight.float(), fp8.weight.float()) and torch.equal(twin.scale, fp8.scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_weights_match_their_dequantized_function(dtype):
    """Layer norm, GELU, residual and split-K with float8 codes: as Fp8Linear's torch function."""
    M, K, N = 37, 100, 77
    linear, norm, g = modules(K, N, 7, dtype)
    fp8 = Fp8Linear(linear)
    x = (2 * torch.randn(M, K, generator=g) + 0.5).to(DEVICE, dtype)
    residual = torch.randn(M, N, generator=g).to(DEVICE, dtype)
    with torch.no_grad():
        for n, gelu, res, tiles in [(None, False, None, None), (norm, True, None, None),
                                    (norm, False, residual, Tiles(16, 32, 32, split_k=3)),
                                    (None, "tanh", residual, Tiles(16, 32, 32))]:
            got = fused_linear(x, fp8, norm=n, gelu=gelu, residual=res, tiles=tiles)
            assert got.dtype == dtype
            err = rel_err(got, expected(x, fp8, n, gelu, res))
            assert err < TOLERANCE[dtype], (n is not None, gelu, tiles, err)
        # and the float8 function is the layer's own up to the codes' rounding (a few per cent at most)
        assert 1e-4 < rel_err(fp8(x), linear(x)) < 0.1
