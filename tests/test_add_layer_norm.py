"""The fused residual add + layer norm kernel against torch's add then layer_norm, on irregular shapes (Triton
interpreter on CPU, compiled on a GPU).

Tolerances: fp32 1e-5 relative / 1e-5 absolute (the statistics are summed in another order); bf16 and fp16
compare with torch's layer norm of the same rounded sum, one rounding of the output apart: bf16 rtol 1.6e-2,
fp16 rtol 2e-3. The residual stream itself must be exactly torch's sum as stored (in bf16 under Triton's
interpreter, which truncates where a GPU rounds, within one ulp).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldlm.kernels.add_layer_norm import add_layer_norm  # conftest set TRITON_INTERPRET=1 where there is no GPU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1), (3, 385), (67, 768), (2, 5, 33)]
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


@pytest.mark.parametrize("rows_per_program", [None, 1, 2])  # None: the device's default (CPU: all rows at once)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_torch_add_then_layer_norm(shape, dtype, rows_per_program):
    g = torch.Generator().manual_seed(sum(shape))
    h, y = (3 * torch.randn(shape, generator=g) + 1 for _ in range(2))
    norm = torch.nn.LayerNorm(shape[-1])
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
        norm.bias.copy_(torch.randn(shape[-1], generator=g))
    norm = norm.to(DEVICE, dtype)
    h, y = h.to(DEVICE, dtype), y.to(DEVICE, dtype)
    expected_h = h + y  # torch's add, rounded to dtype once
    got_h, got = add_layer_norm(h, y, norm, rows_per_program=rows_per_program)
    expected = F.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # of the stream as stored
    assert got_h is h and got.shape == h.shape and got.dtype == dtype
    if dtype == torch.bfloat16 and DEVICE == "cpu":  # the interpreter truncates fp32 -> bf16; a GPU rounds to nearest
        torch.testing.assert_close(h, expected_h, rtol=2**-7, atol=0)  # one bf16 ulp
    else:
        torch.testing.assert_close(h, expected_h, rtol=0, atol=0)  # updated in place, exactly torch's sum
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)


def test_errors_say_what_to_fix():
    norm = torch.nn.LayerNorm(8).to(DEVICE)
    h = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="must match"):
        add_layer_norm(h, torch.zeros(2, 7, device=DEVICE), norm)
    with pytest.raises(ValueError, match="contiguous"):
        add_layer_norm(torch.zeros(8, 2, device=DEVICE).t(), torch.zeros(8, 2, device=DEVICE).t(), norm)
    with pytest.raises(ValueError, match="affine LayerNorm over the last dimension"):
        add_layer_norm(torch.zeros(2, 4, device=DEVICE), torch.zeros(2, 4, device=DEVICE), norm)
