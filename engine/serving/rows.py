"""Step-level batching of the sampling loop: requests at different steps, with different samplers, step counts,
conditions and guidance, share one reverse-transformer forward per iteration (its inputs: ldlm.serving.forward).

Each request is a SamplingRow: its latent, its place on its own timestep grid, its sampler's state (DPM-Solver++'s
previous x0 estimate, the self-conditioning estimate) and its own noise generator, seeded as a lone call seeds
its one (a Pipeline call for one item draws x_T, then each noisy step's noise, from torch.Generator(seed)). The
update after the forward is the reference samplers' own step function (ldlm.sampling.samplers), applied to the
rows that share a step (same sampler, timesteps and coefficients) at once: elementwise arithmetic, so a row's
result does not depend on the rows beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ldlm.inputs import nonfinite_items
from ldlm.model.reverse import Condition
from ldlm.model.schedule import NoiseSchedule, ddim_step, ddpm_step
from ldlm.sampling.samplers import ItemNoise, check_finite, dpmpp_2m_step, randn_like, sampler_timesteps
from ldlm.serving.requests import Request


@dataclass
class SamplingRow:
    """One request in the sampling loop. x: (1, *latent_shape) float32; condition: its Condition (1, L, width),
    projected at admission for a cross-attention model, or None for the null condition (an unconditional
    request, or guidance 0)."""

    request: Request
    x: torch.Tensor
    generator: torch.Generator | ItemNoise
    condition: Condition | None
    timesteps: list[int]
    step: int = 0
    x0_prev: torch.Tensor | None = None  # DPM-Solver++(2M): the previous step's x0 estimate, and its log-SNR step
    h_prev: float | None = None
    previous: torch.Tensor | None = field(default=None)  # self-conditioning: the last (guided) x0 estimate

    @property
    def t(self) -> int:
        return self.timesteps[self.step]

    @property
    def t_next(self) -> int:
        return self.timesteps[self.step + 1] if self.step + 1 < len(self.timesteps) else -1

    @property
    def forward_rows(self) -> int:
        """Rows this request takes in each forward: a guided request reads its condition and the null one."""
        return 2 if self.guided else 1

    @property
    def guided(self) -> bool:
        return self.condition is not None and self.request.guided

    @property
    def done(self) -> bool:
        return self.step >= len(self.timesteps)

    def step_key(self) -> tuple:
        """Rows with equal keys take the same step function with the same coefficients."""
        r = self.request
        if r.sampler == "dpm++2m":
            return (r.sampler, self.t, self.t_next, self.h_prev, self.x0_prev is None)
        return (r.sampler, self.t, self.t_next, r.eta)

    def noise_needed(self) -> bool:
        r = self.request
        if r.sampler == "ddpm":
            return self.t > 0
        return r.sampler == "ddim" and r.eta > 0 and self.t_next >= 0


def stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat, without the copy for one part (a lone request pays no more per step than a Pipeline call)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def start_row(request: Request, x: torch.Tensor, generator: torch.Generator | ItemNoise, condition: Condition | None,
              num_timesteps: int) -> SamplingRow:
    """A request's row from its starting latent x (1, *latent_shape), drawn from `generator` as a lone call draws
    it; `condition` as the request reads it (None when it reads the null condition)."""
    if request.guidance == 0:
        condition = None
    timesteps = sampler_timesteps(request.sampler, num_timesteps, request.steps, request.start_t)
    return SamplingRow(request, x, generator, condition, timesteps)


def advance(rows: list[SamplingRow], estimates: list[torch.Tensor], schedule: NoiseSchedule,
            self_condition: bool) -> dict[int, Exception]:
    """Each row one step on from its x0 estimate, rows of a step key together. Returns the rows (by index in
    `rows`) whose latent became non-finite, each with the error naming the step: they fail alone."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.step_key(), []).append(i)
    failed = {}
    for members in groups.values():
        first = rows[members[0]]
        x = stack([rows[i].x for i in members])
        x0_hat = stack([estimates[i] for i in members])
        noise = None
        if first.noise_needed():  # each row's own draw, of a lone call's shape (1, ...)
            noise = stack([randn_like(rows[i].x, rows[i].generator) for i in members])
        sampler, t, t_next = first.request.sampler, first.t, first.t_next
        h = None
        if sampler == "ddpm":
            x = ddpm_step(schedule, x0_hat, x, t, noise)
        elif sampler == "ddim":
            x = ddim_step(schedule, x0_hat, x, t, t_next, first.request.eta, noise)
        else:
            x0_prev = None if first.x0_prev is None else stack([rows[i].x0_prev for i in members])
            x, h = dpmpp_2m_step(schedule, x0_hat, x, t, t_next, x0_prev, first.h_prev)
        bad = set(nonfinite_items(x))
        for j, i in enumerate(members):
            row = rows[i]
            if j in bad:
                try:
                    check_finite(x[j : j + 1], row.step, row.t)
                except FloatingPointError as e:
                    failed[i] = FloatingPointError(str(e).replace("in batch items [0]", "in this request"))
                continue
            row.x = x if len(members) == 1 else x[j : j + 1]
            row.x0_prev, row.h_prev = estimates[i], h
            if self_condition:
                row.previous = estimates[i]
            row.step += 1
    return failed
