"""The engine's rearranged reverse transformer (ldlm.fast.folded_reverse) against the model it was built from: the same
function of (x_t, the step's t), to float rounding, for one and several latent tokens, with and without
self-conditioning, with torch's norms, the fused Triton ones, or every matmul fused with its neighbours
(ldlm.kernels.fused_linear; interpreter on CPU). (tests/test_fused_sampler.py
runs it through whole sampling loops against the reference.)"""

from __future__ import annotations

import pytest
import torch

from ldlm.fast.folded_reverse import FoldedReverse
from ldlm.model.config import ModelConfig
from ldlm.model.reverse import ReverseTransformer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the fused norms run on CPU only in Triton's interpreter
TIMESTEPS = torch.tensor([999.0, 740.5, 333.0, 12.25, 0.0])  # a sampler's steps, continuous t


def _model(seed: int, **overrides) -> ReverseTransformer:
    torch.manual_seed(seed)
    model = ReverseTransformer(ModelConfig.from_preset("tiny", **overrides)).eval()
    with torch.no_grad():  # non-zero biases and position embeddings, so folding them is exercised
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(DEVICE)


# torch's modules; residual adds + norms in one Triton kernel each; every matmul with its norm, bias, GELU and
# residual in one Triton kernel
KERNELS = {"torch": {}, "fused norms": {"fused_norms": True}, "fused blocks": {"fused_blocks": True}}


@pytest.mark.parametrize("kernels", list(KERNELS))
@pytest.mark.parametrize("overrides", [{}, {"self_condition": True}, {"latent_tokens": 2},
                                       {"latent_tokens": 2, "self_condition": True}])
def test_matches_the_model_at_every_step(overrides, kernels):
    model = _model(0, **overrides)
    folded = FoldedReverse(model, TIMESTEPS, **KERNELS[kernels])
    shape = (4, *model.config.latent_shape)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            x, prev = (torch.randn(shape, generator=g).to(DEVICE) for _ in range(2))
            kwargs = {"x0_prev": prev} if model.config.self_condition else {}
            t_batch, step_index = torch.full((4,), float(t), device=DEVICE), torch.tensor([step], device=DEVICE)
            expected = model(x, t_batch, **kwargs)
            torch.testing.assert_close(folded(x, step_index, **kwargs), expected, rtol=1e-5, atol=1e-6)
            if model.config.self_condition:  # no previous estimate: zeros, as in the model
                torch.testing.assert_close(folded(x, step_index), model(x, t_batch), rtol=1e-5, atol=1e-6)


def test_one_token_as_a_three_dimensional_batch():
    model = _model(2, self_condition=True)
    folded = FoldedReverse(model, TIMESTEPS)
    x, prev = (torch.randn(3, 1, model.config.latent_dim, device=DEVICE) for _ in range(2))
    step = torch.tensor([1], device=DEVICE)
    with torch.no_grad():
        got = folded(x, step, prev)
        assert got.shape == (3, 1, model.config.latent_dim)
        torch.testing.assert_close(got[:, 0], folded(x[:, 0], step, prev[:, 0]), rtol=0, atol=0)


def test_shares_the_models_weights_and_folds_one_token_attention():
    model = _model(3)
    folded = FoldedReverse(model, TIMESTEPS)
    assert folded.blocks is model.blocks and folded.out_proj is model.out_proj
    assert len(folded.value_out) == model.config.n_layers
    assert folded.in_weight.shape == (model.config.d_model, model.config.latent_dim)  # time moved to the bias
    assert folded.step_bias.shape == (len(TIMESTEPS), model.config.d_model)
    assert not any(p.requires_grad for p in folded.value_out.parameters())
    assert len(FoldedReverse(_model(3, latent_tokens=2), TIMESTEPS).value_out) == 0  # attention kept with K > 1


def test_lower_precision_model():
    model = _model(4)
    folded = FoldedReverse(model.to(torch.bfloat16), TIMESTEPS)
    x = torch.randn(5, model.config.latent_dim, dtype=torch.bfloat16, device=DEVICE)
    with torch.no_grad():
        got = folded(x, torch.tensor([2], device=DEVICE))
        expected = model(x, torch.full((5,), float(TIMESTEPS[2]), device=DEVICE))
    assert got.dtype == torch.bfloat16 and folded.step_bias.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("overrides", [{}, {"latent_tokens": 2}])
def test_fp8_weights_match_their_torch_function_and_stay_near_the_model(overrides):
    """fp8_weights: the blocks' matrices (the folded value/output or q/k/v and output projections, the MLP) as
    float8 codes, read by the fused kernel; the same codes through torch's modules give the same function
    (1e-5), a few per cent from the model's own weights; the model's modules and its input/output projections
    are left as they were."""
    from ldlm.kernels.fused_linear import Fp8Linear
    from ldlm.kernels.reference import modules_linear

    model = _model(5, **overrides)
    weights = {name: p.clone() for name, p in model.named_parameters()}
    folded = FoldedReverse(model, TIMESTEPS, fused_blocks=True, fp8_weights=True)
    in_torch = FoldedReverse(model, TIMESTEPS, fused_blocks=True, fp8_weights=True)
    in_torch.linear = modules_linear
    roles = {"value_out", "up", "down"} if model.config.latent_tokens == 1 else {"qkv", "proj", "up", "down"}
    assert all(set(layers) == roles for layers in folded.block_linears)
    assert all(isinstance(m, Fp8Linear) for layers in folded.block_linears for m in layers.values())
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert isinstance(folded.out_proj, torch.nn.Linear) and folded.out_proj is model.out_proj
    shape = (6, *model.config.latent_shape)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            x = torch.randn(shape, generator=g).to(DEVICE)
            step_index = torch.tensor([step], device=DEVICE)
            got = folded(x, step_index)
            torch.testing.assert_close(got, in_torch(x, step_index), rtol=1e-5, atol=1e-6)
            exact = model(x, torch.full((6,), float(t), device=DEVICE))
            err = ((got - exact).norm() / exact.norm()).item()
            assert 1e-4 < err < 0.1, (step, err)


def test_fp8_weights_need_fused_blocks():
    with pytest.raises(ValueError, match="fp8_weights needs fused_blocks=True"):
        FoldedReverse(_model(6), TIMESTEPS, fp8_weights=True)
