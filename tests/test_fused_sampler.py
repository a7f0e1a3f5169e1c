"""The engine's sampling loop (fused kernel, static buffers, device step counter) against the reference
samplers, same seed and same noise: fp32 latents within 1e-5 relative. On CPU it runs eagerly through the
Triton interpreter; bench/gpu_check.sh runs the same comparison with CUDA graphs on a GPU."""

from __future__ import annotations

import pytest
import torch

from ldlm.fast.fused_sampler import FusedSampler, loop_plan
from ldlm.fast.step_tables import ddim_tables, ddpm_tables, dpmpp_2m_tables
from ldlm.model.config import ModelConfig
from ldlm.model.reverse import ReverseTransformer
from ldlm.model.schedule import NoiseSchedule
from ldlm.sampling.samplers import sample_ddim, sample_ddpm, sample_dpmpp_2m

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def reverse():
    torch.manual_seed(0)
    return ReverseTransformer(ModelConfig.from_preset("tiny")).to(DEVICE).eval()


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear().to(DEVICE)


def _start(batch, dim, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(batch, dim, generator=g, device=DEVICE), g


@pytest.mark.parametrize("graphs", [False] + ([True] if DEVICE == "cuda" else []))
def test_ddpm_1000_steps_matches_reference(reverse, schedule, graphs):
    x, g_ref = _start(5, 32, 11)
    expected = sample_ddpm(reverse, x, schedule, generator=g_ref, disable=True)
    x, g = _start(5, 32, 11)
    got = FusedSampler(reverse, ddpm_tables(schedule.to("cpu")), device=DEVICE, graphs=graphs)(x, g)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the generator advanced exactly as in the reference: the next draw agrees
    assert torch.equal(torch.randn(3, generator=g, device=DEVICE), torch.randn(3, generator=g_ref, device=DEVICE))


@pytest.mark.parametrize("graphs", [False] + ([True] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("chunk", [1, 7])  # 7: 39 noisy steps as 5 pieces of 7 and one of 4, then the last step
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_reference(reverse, schedule, eta, chunk, graphs):
    x, g_ref = _start(3, 32, 5)
    expected = sample_ddim(reverse, x, schedule, steps=40, eta=eta, generator=g_ref, disable=True)
    sampler = FusedSampler(reverse, ddim_tables(schedule.to("cpu"), 40, eta), device=DEVICE, graphs=graphs, chunk=chunk)
    for _ in range(2):  # with graphs, the second call replays what the first captured
        x, g = _start(3, 32, 5)
        torch.testing.assert_close(sampler(x, g), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("graphs", [False] + ([True] if DEVICE == "cuda" else []))
@pytest.mark.parametrize(("steps", "chunk", "start_t"), [(20, 1, None), (25, 7, None), (12, 1, 450)])
def test_dpmpp_2m_matches_reference(reverse, schedule, steps, chunk, start_t, graphs):
    """The multistep solver: the kernel reads the previous step's x0_hat from its history buffer and leaves this
    step's there, so graphs of one step or of `chunk` steps replay it; a second call starts from a fresh history."""
    x, _ = _start(4, 32, 6)
    expected = sample_dpmpp_2m(reverse, x, schedule, steps=steps, start_t=start_t, disable=True)
    tables = dpmpp_2m_tables(schedule.to("cpu"), steps, start_t)
    sampler = FusedSampler(reverse, tables, device=DEVICE, graphs=graphs, chunk=chunk)
    for _ in range(2):
        torch.testing.assert_close(sampler(_start(4, 32, 6)[0]), expected, rtol=1e-5, atol=1e-5)
    # the history matters: DDIM on the same steps differs by far more than the tolerance
    ddim = sample_ddim(reverse, x, schedule, steps=steps, start_t=start_t, disable=True)
    assert (ddim - expected).abs().max() > 1e-3


@pytest.mark.parametrize("kernels", ["fused_norms", "fused_blocks"])
@pytest.mark.parametrize("latent_tokens", [1, 2])
def test_fused_kernels_over_a_whole_loop(schedule, latent_tokens, kernels):
    """The residual adds and layer norms as Triton kernels (the default on CUDA, where every test above runs
    them; on CPU, where the interpreter makes them slow, tried here once per model shape), or every matmul with
    its norm, bias, GELU and residual as one (ldlm.kernels.fused_linear)."""
    torch.manual_seed(1)
    model = ReverseTransformer(ModelConfig.from_preset("tiny", latent_tokens=latent_tokens)).to(DEVICE).eval()
    shape = (3, *model.config.latent_shape)
    g_ref = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.randn(shape, generator=g_ref, device=DEVICE)
    expected = sample_ddim(model, x, schedule, steps=20, eta=1.0, generator=g_ref, disable=True)
    sampler = FusedSampler(model, ddim_tables(schedule.to("cpu"), 20, 1.0), device=DEVICE, **{kernels: True})
    assert getattr(sampler.denoiser, kernels)
    g = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.randn(shape, generator=g, device=DEVICE)
    torch.testing.assert_close(sampler(x, g), expected, rtol=1e-5, atol=1e-5)


def test_fp8_weights_over_a_whole_loop(schedule):
    """fused_blocks with float8 weights (not exact: bench/quality/fp8_weights.py measures what they cost): the kernel's
    loop as the same codes through torch's modules, and near the reference."""
    from ldlm.kernels.reference import modules_linear

    torch.manual_seed(3)
    model = ReverseTransformer(ModelConfig.from_preset("tiny")).to(DEVICE).eval()
    tables = ddim_tables(schedule.to("cpu"), 12, 1.0)
    samplers = [FusedSampler(model, tables, device=DEVICE, fused_blocks=True, fp8_weights=True) for _ in range(2)]
    samplers[1].denoiser.linear = modules_linear
    got, in_torch = (s(*_start(3, 32, 4)) for s in samplers)
    torch.testing.assert_close(got, in_torch, rtol=1e-5, atol=1e-5)
    x, g_ref = _start(3, 32, 4)
    expected = sample_ddim(model, x, schedule, steps=12, eta=1.0, generator=g_ref, disable=True)
    assert 1e-4 < ((got - expected).norm() / expected.norm()).item() < 0.1


def test_loop_plan_splits_runs_into_chunks_and_remainders():
    ddpm = [True] * 999 + [False]
    assert loop_plan(ddpm, 1) == [(True, 1)] * 999 + [(False, 1)]
    assert loop_plan(ddpm, 100) == [(True, 100)] * 9 + [(True, 99), (False, 1)]
    assert loop_plan(ddpm, 999) == [(True, 999), (False, 1)]
    assert loop_plan([False] * 50, 1000) == [(False, 50)]  # DDIM with eta = 0: no draws, one piece
    assert sum(n for _, n in loop_plan(ddpm, 37)) == 1000
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        loop_plan(ddpm, 0)


def test_partial_schedule_for_vary(reverse, schedule):
    x, g_ref = _start(2, 32, 9)
    expected = sample_ddpm(reverse, x, schedule, generator=g_ref, disable=True, start_t=299)
    x, g = _start(2, 32, 9)
    got = FusedSampler(reverse, ddpm_tables(schedule.to("cpu"), start_t=299), device=DEVICE, graphs=False)(x, g)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_buffers_are_reused_and_results_do_not_alias(reverse, schedule):
    sampler = FusedSampler(reverse, ddim_tables(schedule.to("cpu"), 10), device=DEVICE, graphs=False)
    a = sampler(_start(4, 32, 1)[0])
    b = sampler(_start(4, 32, 1)[0])
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr() and len(sampler._buffers) == 1


def test_nan_names_the_step(schedule):
    torch.manual_seed(0)
    broken = ReverseTransformer(ModelConfig.from_preset("tiny")).to(DEVICE).eval()
    broken.out_proj.bias.data[3] = float("nan")
    sampler = FusedSampler(broken, ddim_tables(schedule.to("cpu"), 10), device=DEVICE, graphs=False)
    with pytest.raises(FloatingPointError, match=r"non-finite latent at sampling step 0 \(t=999\) in batch items \[0, 1\]"):
        sampler(_start(2, 32, 0)[0])


def test_self_conditioned_model_matches_reference(schedule):
    """Self-conditioning (issue 4 lever): the engine carries the previous x0 estimate in a static buffer."""
    import dataclasses

    from ldlm.sampling.guidance import guided_denoiser

    torch.manual_seed(1)
    model = ReverseTransformer(dataclasses.replace(ModelConfig.from_preset("tiny"), self_condition=True)).to(DEVICE).eval()
    x, g_ref = _start(3, 32, 2)
    expected = sample_ddim(guided_denoiser(model, None, 1.0), x, schedule, steps=30, eta=1.0, generator=g_ref,
                           disable=True)
    x, g = _start(3, 32, 2)
    got = FusedSampler(model, ddim_tables(schedule.to("cpu"), 30, 1.0), device=DEVICE, graphs=False)(x, g)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the estimate really is fed back: without it the result differs
    plain = sample_ddim(model, _start(3, 32, 2)[0], schedule, steps=30, eta=1.0, generator=_start(3, 32, 2)[1],
                        disable=True)
    assert not torch.allclose(plain, expected)
    # with DPM-Solver++(2M) the engine keeps both: the model's previous estimate (self-conditioning, written before
    # the update) and the solver's (the history, which the update kernel reads and rewrites)
    expected = sample_dpmpp_2m(guided_denoiser(model, None, 1.0), x, schedule, steps=12, disable=True)
    got = FusedSampler(model, dpmpp_2m_tables(schedule.to("cpu"), 12), device=DEVICE, graphs=False)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("graphs", [False] + ([True] if DEVICE == "cuda" else []))
@pytest.mark.parametrize(("sampler", "eta"), [("ddpm", 0.0), ("ddim", 1.0), ("dpm++2m", 0.0)])
def test_per_item_noise_table_matches_reference(reverse, schedule, graphs, sampler, eta):
    """Batch jobs' per-item seeds: the engine copies every draw into a device table up front; the reference
    draws step by step. Same values, also with padding rows beyond the seeded items (batch buckets)."""
    from ldlm.sampling.samplers import ItemNoise

    seeds = [7, 8, 9]
    if sampler == "ddpm":
        run_ref = lambda x, g: sample_ddpm(reverse, x, schedule, generator=g, disable=True)  # noqa: E731
        tables = ddpm_tables(schedule.to("cpu"))
    elif sampler == "ddim":
        run_ref = lambda x, g: sample_ddim(reverse, x, schedule, steps=30, eta=eta, generator=g, disable=True)  # noqa: E731
        tables = ddim_tables(schedule.to("cpu"), 30, eta)
    else:  # draws nothing after x_T: the table is empty, the batch jobs' default with preset small
        run_ref = lambda x, g: sample_dpmpp_2m(reverse, x, schedule, steps=15, disable=True)  # noqa: E731
        tables = dpmpp_2m_tables(schedule.to("cpu"), 15)
    noise = ItemNoise(seeds)
    x = noise.randn((32,), DEVICE)
    expected = run_ref(x, noise)
    noise = ItemNoise(seeds)
    x = noise.randn((32,), DEVICE)
    padded = torch.cat([x, torch.zeros(2, 32, device=DEVICE)])  # a bucket of 5 for 3 items
    sampler_ = FusedSampler(reverse, tables, device=DEVICE, graphs=graphs)
    for _ in range(2):  # a second call refills the table (and replays graphs on CUDA)
        got = sampler_(padded, noise)[:3]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        noise = ItemNoise(seeds)
        noise.randn((32,))  # skip x_T, as the first run did


def test_item_noise_serves_the_same_rows_one_by_one_or_at_once():
    from ldlm.sampling.samplers import ItemNoise

    stepwise = ItemNoise([1, 2])
    one_by_one = torch.stack([stepwise.randn((5,)) for _ in range(70)])  # 70 rows, past one block of 64
    a = ItemNoise([1, 2])
    once = torch.cat([a.rows(3, (5,)), a.rows(67, (5,))])
    assert torch.equal(one_by_one, once) and not torch.equal(once[:, 0], once[:, 1])
    with pytest.raises(ValueError, match="one row shape per run"):
        a.rows(1, (6,))
