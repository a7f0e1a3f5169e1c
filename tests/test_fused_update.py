"""The fused update kernel against the reference step math, on irregular shapes (Triton interpreter on CPU).

Tolerances: fp32 1e-6 relative / 1e-6 absolute (one rounding per term); bf16 and fp16 storage compare
with the fp32 reference rounded once to the storage dtype: bf16 rtol 1.6e-2, fp16 rtol 2e-3.
"""

from __future__ import annotations

import pytest
import torch

from ldlm.fast.step_tables import ddim_tables, ddpm_tables, dpmpp_2m_tables
from ldlm.kernels.fused_update import fused_update  # conftest set TRITON_INTERPRET=1 where there is no GPU
from ldlm.model.schedule import NoiseSchedule, ddim_step, ddpm_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1), (3, 385), (67, 768), (5, 7, 33)]
TOLERANCE = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.linear()


def _inputs(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]  # x_t, x0_hat, noise


def _run(tables, step_index, x_t, x0_hat, noise, dtype, clamp=None):
    dev = [t.to(DEVICE, dtype).contiguous() for t in (x_t, x0_hat, noise)]
    t = tables.to(DEVICE)
    step = torch.tensor([step_index], dtype=torch.int64, device=DEVICE)
    return fused_update(*dev, t.coef_x0, t.coef_xt, t.coef_noise, step, clamp=clamp).float().cpu()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("step_index", [0, 500, 999])
def test_ddpm_matches_reference(schedule, shape, dtype, step_index):
    tables = ddpm_tables(schedule)
    x_t, x0_hat, noise = (v.to(dtype).float() for v in _inputs(shape, step_index))  # inputs as stored
    t = int(tables.timesteps[step_index])
    expected = ddpm_step(schedule, x0_hat, x_t, t, noise)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(_run(tables, step_index, x_t, x0_hat, noise, dtype), expected.to(dtype).float(),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_reference_fp32(schedule, shape, eta):
    tables = ddim_tables(schedule, steps=50, eta=eta)
    for step_index in (0, 17, 49):
        x_t, x0_hat, noise = _inputs(shape, step_index)
        t = int(tables.timesteps[step_index])
        t_prev = int(tables.timesteps[step_index + 1]) if step_index + 1 < tables.num_steps else -1
        expected = ddim_step(schedule, x0_hat, x_t, t, t_prev, eta, noise)
        torch.testing.assert_close(_run(tables, step_index, x_t, x0_hat, noise, torch.float32), expected,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clamp", [None, 1.5])
def test_multistep_update_reads_and_keeps_the_history(schedule, shape, dtype, clamp):
    """DPM-Solver++(2M): x_next = a x0_hat + b x_t + p x0_prev, and the history buffer holds (clamped) x0_hat
    after the step, for the next; fp32 reference on the stored inputs, rounded once to the storage dtype."""
    tables = dpmpp_2m_tables(schedule, steps=20)
    x_t, x0_hat, x0_prev = (v.to(dtype).float() for v in _inputs(shape, 5))
    x0_hat = 3 * x0_hat  # some entries beyond the clamp
    step_index = 7
    a, b, p = (float(c[step_index]) for c in (tables.coef_x0, tables.coef_xt, tables.coef_prev))
    assert p != 0
    kept = x0_hat if clamp is None else x0_hat.clamp(-clamp, clamp)
    expected = a * kept + b * x_t + p * x0_prev
    dev = tables.to(DEVICE)
    x_dev, x0_dev, history = (v.to(DEVICE, dtype).contiguous() for v in (x_t, x0_hat, x0_prev))
    out = fused_update(x_dev, x0_dev, torch.zeros_like(x_dev), dev.coef_x0, dev.coef_xt, dev.coef_noise,
                       torch.tensor([step_index], device=DEVICE), clamp=clamp, history=history,
                       coef_prev=dev.coef_prev)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float().cpu(), expected.to(dtype).float(), rtol=rtol, atol=atol)
    assert torch.equal(history.cpu(), kept.to(dtype))


def test_last_ddpm_step_draws_no_noise(schedule):
    tables = ddpm_tables(schedule)
    x_t, x0_hat, noise = _inputs((4, 9), 0)
    last = tables.num_steps - 1
    assert not tables.draws_noise(last) and tables.draws_noise(0)
    torch.testing.assert_close(_run(tables, last, x_t, x0_hat, noise, torch.float32), x0_hat, rtol=1e-6, atol=1e-7)


def test_clamp_of_x0_hat(schedule):
    tables = ddpm_tables(schedule)
    x_t, x0_hat, noise = _inputs((3, 385), 1)
    x0_hat = 4 * x0_hat
    expected = ddpm_step(schedule, x0_hat.clamp(-1.5, 1.5), x_t, 999, noise)
    torch.testing.assert_close(_run(tables, 0, x_t, x0_hat, noise, torch.float32, clamp=1.5), expected,
                               rtol=1e-6, atol=1e-6)


def test_in_place_update_and_device_step_counter(schedule):
    tables = ddpm_tables(schedule).to(DEVICE)
    x_t, x0_hat, noise = (v.to(DEVICE) for v in _inputs((2, 50), 3))
    expected = ddpm_step(schedule, x0_hat.cpu(), x_t.cpu(), 998, noise.cpu())
    step = torch.tensor([0], dtype=torch.int64, device=DEVICE)
    step += 1  # the counter advances on the device; no Python scalar enters the kernel
    fused_update(x_t, x0_hat, noise, tables.coef_x0, tables.coef_xt, tables.coef_noise, step, out=x_t)
    torch.testing.assert_close(x_t.cpu(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's numpy, as meant
def test_non_finite_output_flags_its_first_step(schedule):
    tables = ddpm_tables(schedule).to(DEVICE)
    coefs = (tables.coef_x0, tables.coef_xt, tables.coef_noise)
    x_t, x0_hat, noise = (v.to(DEVICE) for v in _inputs((3, 385), 4))
    first_bad = torch.full((1,), -1, dtype=torch.int64, device=DEVICE)

    def step(index, *inputs):
        fused_update(*inputs, *coefs, torch.tensor([index], device=DEVICE), first_bad=first_bad)
        return int(first_bad)

    assert step(0, x_t, x0_hat, noise) == -1 and step(1, x_t, x0_hat, noise) == -1  # finite: the flag stays
    x0_hat[2, 384] = float("nan")  # the very last element, in the last (partial) block
    assert step(7, x_t, x0_hat, noise) == 7
    x0_hat[0, 0] = float("inf")
    assert step(9, x_t, x0_hat, noise) == 7  # the first bad step is kept
    # checked as stored: 1.1 x the fp16 maximum is finite in the kernel's fp32 arithmetic, infinite in fp16
    first_bad.fill_(-1)
    top = torch.full((2, 5), 65504.0, dtype=torch.float16, device=DEVICE)
    assert step(0, top, top, top) == 0


def test_bad_arguments_are_named(schedule):
    tables = ddpm_tables(schedule)
    x = torch.zeros(2, 3)
    step = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="shapes differ"):
        fused_update(x, torch.zeros(2, 4), torch.zeros(2, 3), tables.coef_x0, tables.coef_xt, tables.coef_noise, step)
    with pytest.raises(ValueError, match="coef_x0 must be a float32 table"):
        fused_update(x, x, x, tables.coef_x0.double(), tables.coef_xt, tables.coef_noise, step)
    with pytest.raises(ValueError, match="first_bad must be a one-element int64"):
        fused_update(x, x, x, tables.coef_x0, tables.coef_xt, tables.coef_noise, step, first_bad=step.int())
    with pytest.raises(ValueError, match="step must be a one-element int64"):
        fused_update(x, x, x, tables.coef_x0, tables.coef_xt, tables.coef_noise, step.int())
    with pytest.raises(ValueError, match="pass history and coef_prev together"):
        fused_update(x, x, x, tables.coef_x0, tables.coef_xt, tables.coef_noise, step, history=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"shapes differ: .* history \(2, 4\)"):
        fused_update(x, x, x, tables.coef_x0, tables.coef_xt, tables.coef_noise, step, history=torch.zeros(2, 4),
                     coef_prev=tables.coef_prev)
    with pytest.raises(ValueError, match="history must be torch.float32"):
        fused_update(x, x, x, tables.coef_x0, tables.coef_xt, tables.coef_noise, step,
                     history=torch.zeros(2, 3, dtype=torch.float16), coef_prev=tables.coef_prev)
