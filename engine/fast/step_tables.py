"""Per-step update coefficients for an x0-predictor, folded into one affine form.

Every sampler's step is affine in (x0_hat, x_t, noise) and, for the multistep solver, the previous step's
x0_hat:

    x_next = a[s] * x0_hat + b[s] * x_t + c[s] * noise + p[s] * x0_prev      (p = 0 but for DPM-Solver++(2M))

DDPM (Ho et al. 2020, eq. 7): a = posterior_mean_coef_x0[t], b = posterior_mean_coef_xt[t],
c = sqrt(posterior_variance[t]), with c = 0 at t = 0.
DDIM (Song et al. 2021, eq. 12) with eps = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t):
a = sqrt(ab_prev) - d * sqrt(ab_t) / sqrt(1 - ab_t), b = d / sqrt(1 - ab_t), c = sigma,
where d = sqrt(1 - ab_prev - sigma^2) and sigma = eta * sqrt((1 - ab_prev)/(1 - ab_t) * (1 - ab_t/ab_prev)).
DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), with alpha = sqrt(ab), sigma = sqrt(1 - ab), lambda =
log(alpha / sigma), h = lambda_next - lambda_t and r = h_prev / h: b = sigma_next / sigma_t,
a = -alpha_next expm1(-h) (1 + 1/(2r)), p = alpha_next expm1(-h) / (2r); first order (p = 0, DDIM's step)
at the first step, and x_next = x0_hat at the last.

Fast backends read a[s], b[s], c[s] (and p[s]) from device tables indexed by a device step counter, so one
captured CUDA graph replays every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ldlm.model.schedule import NoiseSchedule
from ldlm.sampling.samplers import DEFAULT_STEPS, SAMPLERS, check_ddpm_steps, ddim_timesteps, log_snr


@dataclass(frozen=True)
class StepTables:
    timesteps: torch.Tensor  # (S,) long: t at each step, descending
    coef_x0: torch.Tensor  # (S,) a
    coef_xt: torch.Tensor  # (S,) b
    coef_noise: torch.Tensor  # (S,) c; 0 where the step draws no noise
    coef_prev: torch.Tensor  # (S,) p: the previous step's x0_hat's weight; all 0 but for a multistep solver

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    @property
    def multistep(self) -> bool:
        """Whether a step reads the previous step's x0_hat (the engine then keeps a history buffer)."""
        return bool((self.coef_prev != 0).any())

    def draws_noise(self, step: int) -> bool:
        return bool(self.coef_noise[step] != 0)

    def to(self, device) -> StepTables:
        return StepTables(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def ddpm_tables(schedule: NoiseSchedule, start_t: int | None = None) -> StepTables:
    """The reference's own float32 posterior tables (so DDPM coefficients are bit-identical to ddpm_step)."""
    first = schedule.num_timesteps - 1 if start_t is None else start_t
    t = torch.arange(first, -1, -1)
    c = schedule.posterior_variance[t].sqrt()
    c[t == 0] = 0.0  # no noise at the last step
    return StepTables(t, schedule.posterior_mean_coef_x0[t], schedule.posterior_mean_coef_xt[t], c, torch.zeros_like(c))


def ddim_tables(schedule: NoiseSchedule, steps: int, eta: float = 0.0, start_t: int | None = None) -> StepTables:
    """DDIM folded into (a, b, c), computed in float64 from the schedule's alphas_cumprod."""
    first = schedule.num_timesteps - 1 if start_t is None else start_t
    t = torch.tensor(ddim_timesteps(first + 1, min(steps, first + 1)))
    ab_all = schedule.alphas_cumprod.double()
    ab = ab_all[t]
    ab_prev = torch.cat([ab_all[t[1:]], torch.ones(1, dtype=torch.float64)])  # the last step goes to t = -1
    sigma = eta * ((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)).sqrt()
    direction = (1.0 - ab_prev - sigma**2).clamp(min=0.0).sqrt()
    a = ab_prev.sqrt() - direction * ab.sqrt() / (1.0 - ab).sqrt()
    b = direction / (1.0 - ab).sqrt()
    return StepTables(t, a.float(), b.float(), sigma.float(), torch.zeros_like(sigma, dtype=torch.float32))


def dpmpp_2m_tables(schedule: NoiseSchedule, steps: int, start_t: int | None = None) -> StepTables:
    """DPM-Solver++(2M) on DDIM's timesteps, in float64 from the schedule's alphas_cumprod (the arithmetic of
    ldlm.sampling.samplers.sample_dpmpp_2m, step for step)."""
    first = schedule.num_timesteps - 1 if start_t is None else start_t
    t = ddim_timesteps(first + 1, min(steps, first + 1))
    rows = []  # (a, b, p) per step
    h_prev = None
    for step, t_now in enumerate(t):
        t_next = t[step + 1] if step + 1 < len(t) else -1
        if t_next < 0:  # to the data: x_next = x0_hat
            rows.append((1.0, 0.0, 0.0))
            continue
        (_, sigma, lam), (alpha_next, sigma_next, lam_next) = log_snr(schedule, t_now), log_snr(schedule, t_next)
        h = lam_next - lam
        first_order = -alpha_next * math.expm1(-h)  # DDIM's weight of x0_hat
        half_over_r = 0.0 if h_prev is None else 0.5 * h / h_prev  # 1 / (2r), r = h_prev / h
        rows.append((first_order * (1.0 + half_over_r), sigma_next / sigma, -first_order * half_over_r))
        h_prev = h
    a, b, p = torch.tensor(rows).T  # float64 arithmetic, rounded once to float32
    return StepTables(torch.tensor(t), a.contiguous(), b.contiguous(), torch.zeros(len(t)), p.contiguous())


def sampler_tables(sampler: str, schedule: NoiseSchedule, *, steps: int | None = None, eta: float = 0.0,
                   start_t: int | None = None) -> StepTables:
    """The tables of a sampler of ldlm.sampling.samplers.SAMPLERS, for the same arguments (steps None: its default)."""
    if sampler == "ddpm":
        return ddpm_tables(schedule, check_ddpm_steps(schedule.num_timesteps, steps, start_t))
    if sampler == "ddim":
        return ddim_tables(schedule, steps or DEFAULT_STEPS[sampler], eta, start_t)
    if sampler == "dpm++2m":
        return dpmpp_2m_tables(schedule, steps or DEFAULT_STEPS[sampler], start_t)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
