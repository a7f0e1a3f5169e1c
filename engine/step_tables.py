"""Per-step update coefficients for an x0-predictor, folded into one affine form.

Both samplers' steps are affine in (x0_hat, x_t, noise):

    x_next = a[s] * x0_hat + b[s] * x_t + c[s] * noise

DDPM (Ho et al. 2020, eq. 7): a = posterior_mean_coef_x0[t], b = posterior_mean_coef_xt[t],
c = sqrt(posterior_variance[t]), with c = 0 at t = 0.
DDIM (Song et al. 2021, eq. 12) with eps = (x_t - sqrt(ab_t) x0_hat) / sqrt(1 - ab_t):
a = sqrt(ab_prev) - d * sqrt(ab_t) / sqrt(1 - ab_t), b = d / sqrt(1 - ab_t), c = sigma,
where d = sqrt(1 - ab_prev - sigma^2) and sigma = eta * sqrt((1 - ab_prev)/(1 - ab_t) * (1 - ab_t/ab_prev)).

Fast backends read a[s], b[s], c[s] from device tables indexed by a device step counter, so one
captured CUDA graph replays every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .samplers import ddim_timesteps
from .schedule import NoiseSchedule


@dataclass(frozen=True)
class StepTables:
    timesteps: torch.Tensor  # (S,) long: t at each step, descending
    coef_x0: torch.Tensor  # (S,) a
    coef_xt: torch.Tensor  # (S,) b
    coef_noise: torch.Tensor  # (S,) c; 0 where the step draws no noise

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

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
    return StepTables(t, schedule.posterior_mean_coef_x0[t], schedule.posterior_mean_coef_xt[t], c)


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
    return StepTables(t, a.float(), b.float(), sigma.float())
