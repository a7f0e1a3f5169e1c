"""Reverse-diffusion samplers for an x0-predicting model, as plain functions (k-diffusion style).

Every sampler has the signature

    sampler(denoise, x, schedule, *, steps, generator, disable) -> x_0

where `denoise(x_t, t) -> x0_hat` takes t as a float tensor of shape (B,), `x` is the starting
point x_T of shape (B, ...), and `disable` turns the progress bar off. Noise is drawn from
`generator` in a fixed order (one draw of x's shape per noisy step, none at the last step), which
is the contract every fast backend reproduces to match the reference bit for bit.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from ldlm.inputs import check_seed, is_number, nonfinite_items
from ldlm.model.schedule import NoiseSchedule, ddim_step, ddpm_step

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_finite(x: torch.Tensor, step: int, t: int) -> None:
    """Raise naming the step and the batch items where a non-finite value appeared."""
    bad = nonfinite_items(x)
    if bad:
        raise FloatingPointError(
            f"non-finite latent at sampling step {step} (t={t}) in batch items {bad[:10]}; "
            "check the input latents and the checkpoint's weights, or sample in float32"
        )


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced (both ends included)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    grid = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    return grid.tolist()


class ItemNoise:
    """Noise drawn for each batch item from its own generator, seeded by the item's seed (on the CPU, so a seed
    gives the same noise on every device). An item's result then depends on its seed alone, not on the batch
    it ran in or its place there: what batch jobs need to resume and to split work across machines.
    Pass it as a sampler's `generator`.

    Each item's stream is a sequence of rows of one shape, drawn from its generator in blocks of BLOCK rows and
    served in order; so asking for rows one step at a time (the reference samplers) or many at once (the
    engine, which copies a whole table to the device) gives the same values."""

    BLOCK = 64

    def __init__(self, seeds: list[int]):
        for i, seed in enumerate(seeds):
            check_seed(seed, f"seeds[{i}]")
        self.seeds = list(seeds)
        self.generators = [torch.Generator().manual_seed(seed) for seed in self.seeds]
        self._buffers: list[torch.Tensor | None] = [None] * len(self.seeds)  # drawn rows not yet served

    def rows(self, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The next n rows of every item: (n, len(seeds), *shape), float32 on the CPU."""
        out = torch.empty(n, len(self.seeds), *shape)
        for i, generator in enumerate(self.generators):
            buffer = self._buffers[i]
            if buffer is not None and tuple(buffer.shape[1:]) != tuple(shape):
                raise ValueError(f"ItemNoise serves one row shape per run: {tuple(buffer.shape[1:])}, not {shape}")
            while buffer is None or buffer.shape[0] < n:
                block = torch.randn((self.BLOCK, *shape), generator=generator)
                buffer = block if buffer is None else torch.cat([buffer, block])
            out[:, i] = buffer[:n]
            self._buffers[i] = buffer[n:]
        return out

    def randn(self, shape: tuple[int, ...], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The next row of every item: (len(seeds), *shape)."""
        return self.rows(1, shape)[0].to(device=device, dtype=dtype)


def randn_like(x: torch.Tensor, generator: torch.Generator | ItemNoise | None) -> torch.Tensor:
    """Noise of x's shape from `generator`: a torch.Generator's draw, or each item's next row of an ItemNoise."""
    if isinstance(generator, ItemNoise):
        return generator.randn(tuple(x.shape[1:]), x.device, x.dtype)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _time(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


def check_sampling(sampler: str, steps: int | None, eta: float, num_timesteps: int) -> None:
    """Raise, saying what to change, for a sampler name, step count or eta that cannot run (before any work)."""
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
        raise ValueError(f"steps must be a whole number, got {steps!r}")
    if not is_number(eta) or math.isnan(eta):
        raise ValueError(f"eta must be a number in [0, 1] (0 deterministic, 1 ancestral), got {eta!r}")
    if steps is not None and not 1 <= steps <= num_timesteps and sampler != "ddpm":
        raise ValueError(f"steps must be between 1 and {num_timesteps} for sampler {sampler!r}, got {steps}")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta (DDIM's noise scale) applies to sampler 'ddim' only, got eta={eta} with {sampler!r}: "
                         "drop eta, or sample with 'ddim'")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 deterministic, 1 ancestral), got {eta}")


def resolve_sampling(config, sampler: str | None, steps: int | None, eta: float = 0.0) -> tuple[str, int | None]:
    """The sampler and steps to run for a model config (ldlm.model.config.ModelConfig): the given ones, or the config's
    defaults; raises, saying what to change, when they cannot run with this eta."""
    if sampler is None:
        sampler, steps = config.sampler, steps if steps is not None else config.sampling_steps
    check_sampling(sampler, steps, eta, config.num_timesteps)
    return sampler, steps


def check_ddpm_steps(num_timesteps: int, steps: int | None, start_t: int | None) -> int:
    """DDPM runs every timestep from start_t (default T-1) to 0: returns start_t; a different step count is an error."""
    first = num_timesteps - 1 if start_t is None else start_t
    if steps is not None and steps != first + 1:
        raise ValueError(
            f"DDPM runs every timestep ({first + 1} here), got steps={steps}; use the 'ddim' sampler for fewer steps"
        )
    return first


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    disable: bool = False,
    start_t: int | None = None,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) with the posterior of an x0-predictor.

    Runs every timestep from `start_t` (default T-1) down to 0; `steps`, if given, must equal that count.
    """
    for step, t in enumerate(tqdm(sampler_timesteps("ddpm", schedule.num_timesteps, steps, start_t), desc="ddpm",
                                  disable=disable, leave=False)):
        x0_hat = denoise(x, _time(t, x))
        noise = randn_like(x, generator) if t > 0 else None
        x = ddpm_step(schedule, x0_hat, x, t, noise)
        check_finite(x, step, t)
    return x


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int | None = 50,
    generator: torch.Generator | None = None,
    disable: bool = False,
    eta: float = 0.0,
    start_t: int | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) on `steps` evenly spaced timesteps; eta=0 is deterministic.

    With start_t, the grid runs from start_t down to 0 (for partial noising, as in `vary`).
    """
    timesteps = sampler_timesteps("ddim", schedule.num_timesteps, steps, start_t)
    for step, t in enumerate(tqdm(timesteps, desc="ddim", disable=disable, leave=False)):
        t_prev = timesteps[step + 1] if step + 1 < len(timesteps) else -1
        x0_hat = denoise(x, _time(t, x))
        noise = randn_like(x, generator) if eta > 0 and t_prev >= 0 else None
        x = ddim_step(schedule, x0_hat, x, t, t_prev, eta, noise)
        check_finite(x, step, t)
    return x


def log_snr(schedule: NoiseSchedule, t: int) -> tuple[float, float, float]:
    """(alpha_t, sigma_t, lambda_t) = (sqrt(ab_t), sqrt(1 - ab_t), log(alpha_t / sigma_t)), in float64."""
    ab = float(schedule.alphas_cumprod[t].double())
    return math.sqrt(ab), math.sqrt(1.0 - ab), 0.5 * math.log(ab / (1.0 - ab))


@torch.no_grad()
def sample_dpmpp_2m(
    denoise: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    *,
    steps: int | None = 20,
    generator: torch.Generator | None = None,
    disable: bool = False,
    start_t: int | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models", Algorithm 2): a second-order multistep solver of the probability-flow ODE in the data (x0)
    prediction, on DDIM's timesteps. Each step extrapolates from this step's and the previous step's x0 estimates,
    so it costs one model call, as DDIM's does, and its error falls as 1/steps^2 rather than 1/steps. The first
    step is first order (it has no previous estimate) and so is the last, to the data (sigma = 0), as in the
    paper's implementation; both equal DDIM's. Deterministic: `generator` is unused.
    """
    timesteps = sampler_timesteps("dpm++2m", schedule.num_timesteps, steps, start_t)
    x0_prev, h_prev = None, None
    for step, t in enumerate(tqdm(timesteps, desc="dpm++2m", disable=disable, leave=False)):
        t_next = timesteps[step + 1] if step + 1 < len(timesteps) else -1
        x0_hat = denoise(x, _time(t, x))
        x, h = dpmpp_2m_step(schedule, x0_hat, x, t, t_next, x0_prev, h_prev)
        x0_prev, h_prev = x0_hat, h
        check_finite(x, step, t)
    return x


def dpmpp_2m_step(schedule: NoiseSchedule, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int, t_next: int,
                  x0_prev: torch.Tensor | None, h_prev: float | None) -> tuple[torch.Tensor, float | None]:
    """One DPM-Solver++(2M) step x_t -> x_{t_next} from this step's x0 estimate and the previous step's
    (x0_prev, and h_prev, the previous step in log-SNR; None at the first step, which is first order).
    Returns (x_{t_next}, h): t_next = -1 is the last step, to the data (returns x0_hat, h None)."""
    if t_next < 0:  # to the data (sigma = 0): x = x0_hat
        return x0_hat, None
    (_, sigma, lam), (alpha_next, sigma_next, lam_next) = log_snr(schedule, t), log_snr(schedule, t_next)
    h = lam_next - lam  # the step in log signal-to-noise ratio, > 0
    if x0_prev is None:
        direction = x0_hat
    else:
        r = h_prev / h
        direction = (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev
    return (sigma_next / sigma) * x_t - alpha_next * math.expm1(-h) * direction, h


def sampler_timesteps(sampler: str, num_timesteps: int, steps: int | None, start_t: int | None) -> list[int]:
    """The timesteps a sampler visits, from start_t (default T-1) down to 0: every one for DDPM (where `steps`,
    if given, must be their count), else `steps` evenly spaced ones (None: DEFAULT_STEPS)."""
    if sampler == "ddpm":
        return list(range(check_ddpm_steps(num_timesteps, steps, start_t), -1, -1))
    first = num_timesteps - 1 if start_t is None else start_t
    return ddim_timesteps(first + 1, min(steps or DEFAULT_STEPS[sampler], first + 1))


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpm++2m": sample_dpmpp_2m}
DEFAULT_STEPS = {"ddim": 50, "dpm++2m": 20}  # when steps is None (DDPM runs every timestep)
