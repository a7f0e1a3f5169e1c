"""The Gaussian diffusion schedule and the per-step math for an x0-predicting model.

Everything here is a plain function of precomputed tables (`NoiseSchedule`), so every backend
(reference, Triton kernel, ONNX) reproduces the same numbers from the same tables.

References: Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (eq. 6-7, the posterior
q(x_{t-1} | x_t, x_0)); Song et al. 2021, "Denoising Diffusion Implicit Models" (eq. 12).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """Tables indexed by the integer timestep t in [0, T). Computed in float64, stored in float32."""

    betas: torch.Tensor  # (T,)
    alphas_cumprod: torch.Tensor  # (T,) running product of 1 - beta
    alphas_cumprod_prev: torch.Tensor  # (T,) alphas_cumprod[t-1], with 1 at t=0
    sqrt_alphas_cumprod: torch.Tensor  # (T,)
    sqrt_one_minus_alphas_cumprod: torch.Tensor  # (T,)
    posterior_mean_coef_x0: torch.Tensor  # (T,) weight of x0 in the posterior mean
    posterior_mean_coef_xt: torch.Tensor  # (T,) weight of x_t in the posterior mean
    posterior_variance: torch.Tensor  # (T,) beta_tilde_t; 0 at t=0

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> NoiseSchedule:
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        ab = torch.cumprod(alphas, dim=0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        tables = dict(
            betas=betas,
            alphas_cumprod=ab,
            alphas_cumprod_prev=ab_prev,
            sqrt_alphas_cumprod=ab.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - ab).sqrt(),
            posterior_mean_coef_x0=betas * ab_prev.sqrt() / (1.0 - ab),
            posterior_mean_coef_xt=(1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab),
            posterior_variance=betas * (1.0 - ab_prev) / (1.0 - ab),
        )
        return cls(**{k: v.to(torch.float32) for k, v in tables.items()})

    @classmethod
    def from_config(cls, config) -> NoiseSchedule:
        return cls.linear(config.num_timesteps, config.beta_start, config.beta_end)

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> NoiseSchedule:
        return NoiseSchedule(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


def _per_item(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped to broadcast over `like`: (B,) -> (B, 1, ..., 1)."""
    values = table.to(like.device)[t.to(like.device)]
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(sqrt(ab_t) x0, (1 - ab_t) I). x0, noise: (B, ...); t: (B,) integer."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    return _per_item(schedule.sqrt_alphas_cumprod, t, x0) * x0 + _per_item(
        schedule.sqrt_one_minus_alphas_cumprod, t, x0
    ) * noise


def ddpm_step(
    schedule: NoiseSchedule, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int, noise: torch.Tensor | None
) -> torch.Tensor:
    """One ancestral DDPM step x_t -> x_{t-1} for an x0-predictor (Ho et al. 2020, eq. 6-7).

    x_{t-1} = coef_x0[t] * x0_hat + coef_xt[t] * x_t + sqrt(beta_tilde[t]) * noise; no noise at t = 0.
    """
    mean = schedule.posterior_mean_coef_x0[t] * x0_hat + schedule.posterior_mean_coef_xt[t] * x_t
    if t == 0 or noise is None:
        return mean
    return mean + schedule.posterior_variance[t].sqrt() * noise


def ddim_step(
    schedule: NoiseSchedule,
    x0_hat: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} for an x0-predictor (Song et al. 2021, eq. 12).

    eps is derived from x0_hat; t_prev = -1 means the final step (alpha_cumprod = 1, returns x0_hat).
    eta = 0 is deterministic; eta = 1 with t_prev = t - 1 is exactly the DDPM posterior.
    """
    ab_t = schedule.alphas_cumprod[t]
    ab_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(ab_t)
    eps = (x_t - ab_t.sqrt() * x0_hat) / (1.0 - ab_t).sqrt()
    sigma = eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)).sqrt()
    direction = (1.0 - ab_prev - sigma**2).clamp(min=0.0).sqrt()
    x_prev = ab_prev.sqrt() * x0_hat + direction * eps
    if noise is None or eta == 0.0 or t_prev < 0:
        return x_prev
    return x_prev + sigma * noise
