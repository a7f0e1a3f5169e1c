"""The schedule and samplers: golden numbers (as diffusers tests its schedulers) and identities of the math."""

from __future__ import annotations

import math

import pytest
import torch

from ldlm.fast.step_tables import sampler_tables
from ldlm.model.config import SAMPLER_NAMES
from ldlm.model.schedule import NoiseSchedule, add_noise, ddim_step, ddpm_step
from ldlm.sampling.samplers import SAMPLERS, ddim_timesteps, sample_ddim, sample_ddpm, sample_dpmpp_2m


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear(1000, 0.00085, 0.012)


def test_tables_match_a_float64_recomputation(schedule):
    ab = 1.0
    for t in range(1000):
        beta = 0.00085 + (0.012 - 0.00085) * t / 999
        ab_prev, ab = ab, ab * (1 - beta)
        if t in (0, 1, 250, 999):
            assert schedule.alphas_cumprod[t].item() == pytest.approx(ab, rel=1e-6)
            assert schedule.posterior_variance[t].item() == pytest.approx(beta * (1 - ab_prev) / (1 - ab), rel=1e-5, abs=1e-12)


@pytest.mark.parametrize(
    "t, alphas_cumprod, coef_x0, coef_xt, variance",
    [
        (0, 0.9991499781608582, 1.0, 0.0, 0.0),
        (1, 0.9982895851135254, 0.5032626390457153, 0.4967372715473175, 0.0004279551503714174),
        (499, 0.16181214153766632, 0.0030907110776752234, 0.9955418705940247, 0.006411412730813026),
        (999, 0.0015789628960192204, 0.00048047967720776796, 0.993962824344635, 0.011999769136309624),
    ],
)
def test_golden_numbers(schedule, t, alphas_cumprod, coef_x0, coef_xt, variance):
    assert schedule.alphas_cumprod[t].item() == pytest.approx(alphas_cumprod, rel=1e-6)
    assert schedule.posterior_mean_coef_x0[t].item() == pytest.approx(coef_x0, rel=1e-6)
    assert schedule.posterior_mean_coef_xt[t].item() == pytest.approx(coef_xt, rel=1e-6, abs=1e-9)
    assert schedule.posterior_variance[t].item() == pytest.approx(variance, rel=1e-5, abs=1e-12)


def test_posterior_mean_is_an_interpolation_at_every_t(schedule):
    # q(x_{t-1}|x_t,x0) with x_t = sqrt(ab_t) x0 exactly (no noise) must give sqrt(ab_{t-1}) x0
    x0 = torch.ones(1)
    for t in (1, 10, 500, 999):
        x_t = schedule.sqrt_alphas_cumprod[t] * x0
        mean = ddpm_step(schedule, x0, x_t, t, None)
        assert mean.item() == pytest.approx(schedule.alphas_cumprod_prev[t].sqrt().item(), rel=1e-5)


def test_add_noise_statistics(schedule):
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 2.0)
    for t in (0, 300, 999):
        ts = torch.full((x0.shape[0],), t)
        x_t = add_noise(schedule, x0, ts, torch.randn(x0.shape, generator=g))
        ab = schedule.alphas_cumprod[t].item()
        assert x_t.mean().item() == pytest.approx(2.0 * math.sqrt(ab), abs=0.01)
        assert x_t.std().item() == pytest.approx(math.sqrt(1 - ab), rel=0.01)


def test_add_noise_rejects_mismatched_shapes(schedule):
    with pytest.raises(ValueError, match="same shape"):
        add_noise(schedule, torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4))


def dummy_x0_predictor(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.tanh(x_t)


def test_full_1000_step_ddpm_loop_golden(schedule):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=g)
    out = sample_ddpm(dummy_x0_predictor, x, schedule, generator=g, disable=True)
    expected = torch.tensor([[0.07556374371051788, -0.03589356690645218, 0.022930460050702095],
                             [0.027075685560703278, 0.005276714917272329, -0.010496173053979874]])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_ddpm_is_reproducible_and_seed_dependent(schedule):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return sample_ddpm(dummy_x0_predictor, torch.randn(4, 5, generator=g), schedule, generator=g, disable=True)

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_ddim_with_every_step_and_eta_1_is_ddpm(schedule):
    def run(sampler, **kw):
        g = torch.Generator().manual_seed(3)
        return sampler(dummy_x0_predictor, torch.randn(3, 7, generator=g), schedule, generator=g, disable=True, **kw)

    torch.testing.assert_close(run(sample_ddim, steps=1000, eta=1.0), run(sample_ddpm), rtol=1e-4, atol=1e-5)


def test_ddim_eta_0_is_deterministic_and_ignores_generator(schedule):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    a = sample_ddim(dummy_x0_predictor, x, schedule, steps=20, generator=torch.Generator().manual_seed(1), disable=True)
    b = sample_ddim(dummy_x0_predictor, x, schedule, steps=20, generator=torch.Generator().manual_seed(2), disable=True)
    assert torch.equal(a, b)


def test_ddim_last_step_returns_x0_hat(schedule):
    x0_hat, x_t = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(ddim_step(schedule, x0_hat, x_t, 20, -1, 0.0, None), x0_hat)


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 5) == [999, 749, 500, 250, 0]
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
        ddim_timesteps(1000, 0)


def test_ddpm_refuses_a_step_count(schedule):
    with pytest.raises(ValueError, match="use the 'ddim' sampler"):
        sample_ddpm(dummy_x0_predictor, torch.zeros(1, 2), schedule, steps=50, disable=True)


def test_nan_names_the_step(schedule):
    def explodes_at_t_500(x_t, t):
        return torch.full_like(x_t, float("nan")) if t[0] == 500 else x_t

    with pytest.raises(FloatingPointError, match=r"step 499 \(t=500\)"):
        sample_ddpm(explodes_at_t_500, torch.zeros(2, 3), schedule, disable=True)


def test_config_lists_every_sampler():
    assert tuple(SAMPLERS) == SAMPLER_NAMES


@pytest.mark.parametrize("steps", [1, 2])
def test_dpmpp_2m_with_one_or_two_steps_is_ddim(schedule, steps):
    """Its first step has no previous estimate and its last goes to the data: both first order, DDIM's steps."""
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    ddim = sample_ddim(dummy_x0_predictor, x, schedule, steps=steps, disable=True)
    torch.testing.assert_close(sample_dpmpp_2m(dummy_x0_predictor, x, schedule, steps=steps, disable=True), ddim,
                               rtol=1e-6, atol=1e-7)
    three = sample_dpmpp_2m(dummy_x0_predictor, x, schedule, steps=3, disable=True)  # now the second step extrapolates
    assert not torch.allclose(three, sample_ddim(dummy_x0_predictor, x, schedule, steps=3, disable=True), atol=1e-4)


def test_dpmpp_2m_is_second_order_on_gaussian_data(schedule):
    """Data ~ N(0, s2 I): x0_hat = E[x0 | x_t] = k_t x_t in closed form, and the probability-flow ODE keeps
    x_t / sqrt(ab_t s2 + 1 - ab_t) constant, so the exact endpoint is known (both solvers end with
    x0_hat at t = 0). Doubling the steps divides DDIM's error by about 2 (first order) and DPM-Solver++(2M)'s by
    more than 3 (second order, 3.5 measured from 160 to 320 steps)."""
    s2, ab = 0.25, schedule.alphas_cumprod.double()

    def k(t):
        return ab[t].sqrt() * s2 / (ab[t] * s2 + 1 - ab[t])

    def denoise(x_t, t):
        return k(t.long()).view(-1, 1) * x_t

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = k(0) * x * ((ab[0] * s2 + 1 - ab[0]) / (ab[-1] * s2 + 1 - ab[-1])).sqrt()

    def error(sampler, steps):
        return (sampler(denoise, x, schedule, steps=steps, disable=True) - exact).abs().max().item()

    ddim = {n: error(sample_ddim, n) for n in (160, 320)}
    dpm = {n: error(sample_dpmpp_2m, n) for n in (160, 320)}
    assert 1.8 < ddim[160] / ddim[320] < 2.2, ddim
    assert dpm[160] / dpm[320] > 3.0, dpm
    assert dpm[320] < ddim[320] / 3, (dpm, ddim)


def test_dpmpp_2m_golden(schedule):
    """20 steps on the dummy predictor; the numbers agree to 1e-7 with k-diffusion's sample_dpmpp_2m ported to
    this schedule in float64 (its variance-exploding frame x / alpha, sigma = sqrt((1 - ab) / ab))."""
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    out = sample_dpmpp_2m(dummy_x0_predictor, x, schedule, steps=20, disable=True)
    expected = torch.tensor([[0.13004860281944275, -0.03302396461367607, -0.16336731612682343],
                             [0.06037004664540291, -0.1013249009847641, -0.12162958085536957]])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("sampler", "kwargs"), [("ddpm", {}), ("ddim", {"steps": 13, "eta": 0.7}),
                                                 ("ddim", {"steps": 9, "start_t": 400}), ("dpm++2m", {"steps": 17}),
                                                 ("dpm++2m", {"steps": 6, "start_t": 300})])
def test_step_tables_replay_each_sampler(schedule, sampler, kwargs):
    """The engine's affine tables x = a x0_hat + b x + c noise + p x0_prev, run by a plain loop in float64 with the
    same noise, give the reference sampler's result: the tables the fused kernel reads are the samplers' math."""
    tables = sampler_tables(sampler, schedule, **kwargs)
    g = torch.Generator().manual_seed(4)
    x_start = torch.randn(3, 5, generator=g, dtype=torch.float64)
    expected = SAMPLERS[sampler](dummy_x0_predictor, x_start, schedule, generator=g, disable=True, **kwargs)
    g = torch.Generator().manual_seed(4)
    torch.randn(3, 5, generator=g, dtype=torch.float64)
    x, x0_prev = x_start, torch.zeros_like(x_start)
    for s, t in enumerate(tables.timesteps.tolist()):
        x0_hat = dummy_x0_predictor(x, torch.full((3,), float(t)))
        noise = torch.randn(3, 5, generator=g, dtype=torch.float64) if tables.draws_noise(s) else 0.0
        x = (tables.coef_x0[s] * x0_hat + tables.coef_xt[s] * x + tables.coef_noise[s] * noise
             + tables.coef_prev[s] * x0_prev)
        x0_prev = x0_hat
    assert tables.multistep == (sampler == "dpm++2m")
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-6)  # the tables are float32: one rounding each
