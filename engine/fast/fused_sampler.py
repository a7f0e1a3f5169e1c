"""The engine's sampling loop: static buffers, the fused Triton update, and (on CUDA) captured graphs.

Per step: x0_hat = reverse(x, t[step]) (as ldlm.fast.folded_reverse rearranges it: each step's time is a row of an
input-bias table); noise drawn into a fixed buffer from the caller's generator;
x = a[step] x0_hat + b[step] x + c[step] noise (+ p[step] x0_prev, DPM-Solver++(2M)'s previous estimate, which
the kernel keeps in a history buffer) in one kernel; step += 1 — all on the device, so the same captured graph
replays every step. Steps that draw no noise (DDPM's last, all of DDIM with eta = 0 and DPM-Solver++) use
a second variant without the draw, so the generator advances exactly as in the reference samplers and
fp32 results match them to rounding.

A conditional model (cross-attention) reads its condition's keys and values from static buffers, projected
once per run (ldlm.fast.folded_reverse.ConditionStates); a guided run (weight w other than 0 and 1) denoises each
item's conditional and null rows as one (2B)-row forward and combines them, x0 = x0_null + w (x0_cond -
x0_null), with w a device scalar, so one captured graph serves every w. Condition lengths are bucketed to
powers of two (masked padding), so a graph serves every source up to its bucket.

Capture granularity is `chunk` steps per graph (1 = one step per graph): each run of steps alike in drawing
noise is split into `chunk`-step pieces and one remainder piece, each replayed from a graph of its length, so
no step runs eagerly between replays. The graphs of one batch shape share one memory pool (they never run
concurrently, and everything that outlives a replay is in static buffers); they are cached per (batch bucket,
dtype, tables). Without CUDA (or with graphs=False) the same pieces run eagerly, which is what CPU tests check
against the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import groupby

import torch

from ldlm.fast.buckets import next_power_of_two
from ldlm.fast.folded_reverse import ConditionStates, FoldedReverse
from ldlm.fast.step_tables import StepTables
from ldlm.model.reverse import Condition
from ldlm.sampling.samplers import ItemNoise


def _fused_update():
    try:
        from ldlm.kernels.fused_update import fused_update
    except ImportError as e:  # triton missing
        raise RuntimeError("the fused sampler needs triton: pip install triton (or use backend='reference')") from e
    return fused_update


@dataclass
class _Buffers:
    x: torch.Tensor  # (B, D) the latent being denoised, updated in place
    noise: torch.Tensor  # (B, D) this step's noise
    step: torch.Tensor  # (1,) int64 device step counter
    first_bad_step: torch.Tensor  # (1,) int64: first step whose output was non-finite, -1 while all are finite
    x0_prev: torch.Tensor  # (B, D) the previous step's x0 estimate (self-conditioned models; zeros at the start)
    history: torch.Tensor  # (B, D) the previous step's clamped x0_hat, for a multistep solver (the kernel keeps it)
    noise_table: torch.Tensor | None = None  # (draws, B, D) per-item noise (ItemNoise), filled before each run
    draw_index: torch.Tensor | None = None  # (1,) int64 device counter: the table row the next draw reads
    condition: ConditionStates | None = None  # a conditional model's static condition keys and values (2B rows guided)
    guidance: torch.Tensor | None = None  # (1,) the guidance weight w of a guided run
    graphs: dict = field(default_factory=dict)  # (draws_noise, from_table, steps) -> CUDAGraph of that many steps
    pool: tuple | None = None  # the memory pool the graphs above share


def loop_plan(draws: list[bool], chunk: int) -> list[tuple[bool, int]]:
    """The sampling loop as pieces (draws noise, steps): each run of steps alike in drawing noise, split into
    `chunk`-step pieces and one remainder. E.g. DDPM's 999 noisy steps and one final step, chunk 100:
    9 x (True, 100), (True, 99), (False, 1)."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 step per graph, got {chunk}")
    plan = []
    for draw, run in groupby(draws):
        n = len(list(run))
        plan += [(draw, chunk)] * (n // chunk) + ([(draw, n % chunk)] if n % chunk else [])
    return plan


class FusedSampler:
    """Runs a StepTables schedule with the reverse transformer on static buffers."""

    def __init__(self, reverse: torch.nn.Module, tables: StepTables, *, device: torch.device | str,
                 dtype: torch.dtype = torch.float32, graphs: bool | None = None, chunk: int = 1,
                 clamp: float | None = None, fused_norms: bool | None = None, fused_blocks: bool = False,
                 fp8_weights: bool = False):
        """graphs: capture the steps as CUDA graphs (default: on CUDA); chunk: steps per graph; clamp: clamp
        x0_hat to [-clamp, clamp] (as the model was trained); fused_norms: each residual add and the layer norm
        after it as one Triton kernel (default: on CUDA; Triton's CPU interpreter runs it far slower than torch);
        fused_blocks: each matmul of the model with its layer norm, bias, GELU and residual as one Triton kernel
        (ldlm.kernels.fused_linear; off until a GPU run measures it: bench/gpu/fused_blocks.py); fp8_weights: with
        fused_blocks, the blocks' weights read as float8 e4m3 with per-channel scales (not exact:
        bench/quality/fp8_weights.py measures its latents and text against the model's own weights)."""
        self.device, self.dtype, self.clamp = torch.device(device), dtype, clamp
        self.self_condition = reverse.config.self_condition
        self.draws = (tables.coef_noise.cpu() != 0).tolist()  # per step: draws noise? (read once, not per call)
        self.multistep = tables.multistep  # the update also reads the previous step's x0_hat (DPM-Solver++(2M))
        self.plan = loop_plan(self.draws, chunk)
        self.tables = tables.to(self.device)
        self.coef_prev = self.tables.coef_prev if self.multistep else None  # the kernel reads it with the history
        # the model with each step's time folded into an input bias (a step gathers its row by the device step
        # counter), one-token attention's two projections into one, residual adds fused with the norms after
        # them (on CUDA)
        fused_norms = self.device.type == "cuda" if fused_norms is None else fused_norms
        self.denoiser = FoldedReverse(reverse, self.tables.timesteps, fused_norms=fused_norms,
                                      fused_blocks=fused_blocks, fp8_weights=fp8_weights)
        self.graphs = (self.device.type == "cuda") if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise RuntimeError("CUDA graphs need a CUDA device; pass graphs=False to run eagerly")
        self.fused_update = _fused_update()
        self._rng = torch.Generator(device=self.device) if self.graphs else None
        self._buffers: dict[tuple[int, int], _Buffers] = {}

    def _denoise(self, buf: _Buffers) -> torch.Tensor:
        """This step's x0_hat (B, *latent): one branch, or a guided run's two as one (2B)-row forward."""
        prev = buf.x0_prev if self.self_condition else None
        if buf.guidance is None:
            return self.denoiser(buf.x, buf.step, prev, buf.condition)
        both = self.denoiser(torch.cat([buf.x, buf.x]), buf.step, None if prev is None else torch.cat([prev, prev]),
                             buf.condition)
        x0_cond, x0_null = both.split(buf.x.shape[0])
        return x0_null + buf.guidance * (x0_cond - x0_null)  # as ldlm.sampling.guidance.guided_denoiser

    def _one_step(self, buf: _Buffers, generator: torch.Generator | None, draw: bool, from_table: bool) -> None:
        x0_hat = self._denoise(buf).to(self.dtype)
        if self.self_condition:
            buf.x0_prev.copy_(x0_hat)
        if draw and from_table:  # per-item noise, pre-drawn into the table (static, so graphs replay it)
            buf.noise.copy_(buf.noise_table.index_select(0, buf.draw_index)[0])
            buf.draw_index.add_(1)
        elif draw:
            buf.noise.normal_(generator=generator)
        self.fused_update(buf.x, x0_hat.contiguous(), buf.noise, self.tables.coef_x0, self.tables.coef_xt,
                          self.tables.coef_noise, buf.step, out=buf.x, clamp=self.clamp,
                          first_bad=buf.first_bad_step,  # the kernel flags a non-finite output: no sync, no extra pass
                          history=buf.history if self.multistep else None, coef_prev=self.coef_prev)
        buf.step.add_(1)

    def _buffers_for(self, shape: tuple[int, ...], guided: bool = False, condition_length: int = 0) -> _Buffers:
        key = (tuple(shape), guided, condition_length)  # (B, D), or (B, K, D) latent tokens
        if key not in self._buffers:
            x = torch.zeros(shape, device=self.device, dtype=self.dtype)
            counter = torch.zeros(1, dtype=torch.int64, device=self.device)
            buf = _Buffers(x, torch.zeros_like(x), counter, torch.full_like(counter, -1), torch.zeros_like(x),
                           torch.zeros_like(x))
            if self.denoiser.conditional:
                cfg = self.denoiser.config
                rows, H = shape[0] * (2 if guided else 1), cfg.n_heads
                head = (rows, H, condition_length, cfg.d_model // H)
                buf.condition = ConditionStates(
                    [(x.new_zeros(head), x.new_zeros(head)) for _ in range(cfg.n_layers)],
                    torch.zeros(rows, condition_length, dtype=torch.bool, device=self.device))
                buf.guidance = x.new_zeros(1) if guided else None
            self._buffers[key] = buf
        return self._buffers[key]

    def _condition_buffers(self, x_start: torch.Tensor, condition: Condition | None, guidance: float) -> _Buffers:
        """The buffers of this run, holding its condition's keys and values (conditional models) and weight."""
        if not self.denoiser.conditional:
            if condition is not None:
                raise ValueError("this reverse transformer is unconditional: it takes no condition")
            return self._buffers_for(x_start.shape)
        B = x_start.shape[0]
        if condition is not None and condition.tokens.shape[0] != B:
            raise ValueError(f"the condition has {condition.tokens.shape[0]} rows for {B} latents: give one each")
        guided = condition is not None and guidance not in (0, 1)
        if condition is None or guidance == 0:
            condition = self.denoiser.null(B)
        elif guided:  # each item's conditional rows, then its null rows
            condition = Condition.cat([condition, self.denoiser.null(B)])
        length = next_power_of_two(condition.tokens.shape[1])
        buf = self._buffers_for(x_start.shape, guided, length)
        states = self.denoiser.condition_states(condition.padded(length))
        for (k_buf, v_buf), (k, v) in zip(buf.condition.keys_values, states.keys_values):
            k_buf.copy_(k)
            v_buf.copy_(v)
        buf.condition.mask.copy_(states.mask)
        if guided:
            buf.guidance.fill_(guidance)
        return buf

    def _graph(self, buf: _Buffers, draw: bool, from_table: bool, steps: int) -> torch.cuda.CUDAGraph:
        """Capture `steps` steps (with or without the noise draw, from the generator or the table) once per
        buffer; the caller resets the buffers and the generator state afterwards, so warm-up and capture leave
        no trace in results."""
        key = (draw, from_table, steps)
        if key not in buf.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on a side stream (allocations, autotuning, lazy init)
                for _ in range(2):
                    buf.step.zero_()
                    if from_table:
                        buf.draw_index.zero_()
                    self._one_step(buf, self._rng, draw, from_table)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self._rng)  # graph-safe Philox: each replay advances its offset
            buf.step.zero_()
            if from_table:
                buf.draw_index.zero_()
            if buf.pool is None:
                buf.pool = torch.cuda.graph_pool_handle()
            # thread_local: a capture fails only on this thread's unsafe calls, not on another thread's work (threads
            # sharing a pipeline take turns on the engine, ldlm.pipeline, but draw their own x_T meanwhile)
            with torch.cuda.graph(graph, pool=buf.pool, capture_error_mode="thread_local"):
                for _ in range(steps):
                    self._one_step(buf, self._rng, draw, from_table)
            buf.graphs[key] = graph
        return buf.graphs[key]

    @torch.no_grad()
    def __call__(self, x_start: torch.Tensor, generator: torch.Generator | ItemNoise | None = None, *,
                 condition: Condition | None = None, guidance: float = 1.0) -> torch.Tensor:
        """Denoise x_start (B, *latent_shape) through every step of the tables; returns a new tensor of its shape.
        With per-item noise (ItemNoise, batch jobs) every draw the run needs is taken from it up front into a
        device table that the steps (graphed or not) read in order: the same values the reference samplers draw
        step by step. A conditional model reads `condition` (B rows; None: the null condition) with classifier-
        free guidance weight `guidance` (checked by the caller, ldlm.sampling.guidance.check_guidance)."""
        buf = self._condition_buffers(x_start, condition, guidance)
        draws = self.draws
        from_table = isinstance(generator, ItemNoise)
        rng = None if from_table else generator
        if from_table:
            n_draws = sum(draws)
            if buf.noise_table is None:
                buf.noise_table = torch.zeros(max(1, n_draws), *buf.x.shape, device=self.device, dtype=self.dtype)
                buf.draw_index = torch.zeros(1, dtype=torch.int64, device=self.device)
            if n_draws:  # items beyond len(seeds) are the batch bucket's padding: zero noise
                rows = generator.rows(n_draws, tuple(buf.x.shape[1:]))  # (draws, items, D)
                buf.noise_table[:, : rows.shape[1]].copy_(rows)
                buf.noise_table[:, rows.shape[1] :].zero_()
        if self.graphs:  # graphs draw from one registered generator, synced with the caller's before and after
            for draw, steps in dict.fromkeys(self.plan):  # each distinct piece once, in the loop's order
                self._graph(buf, draw, from_table, steps)
            rng = self._rng
            if generator is not None and not from_table:
                rng.set_state(generator.get_state())
        buf.x.copy_(x_start)
        buf.step.zero_()
        if from_table:
            buf.draw_index.zero_()
        buf.first_bad_step.fill_(-1)
        buf.x0_prev.zero_()
        buf.history.zero_()  # read at the first step with weight 0: it must be finite
        for draw, steps in self.plan:
            if self.graphs:
                buf.graphs[(draw, from_table, steps)].replay()
            else:
                for _ in range(steps):
                    self._one_step(buf, rng, draw, from_table)
        if self.graphs and generator is not None and not from_table:
            generator.set_state(rng.get_state())
        bad = int(buf.first_bad_step)  # the one host synchronization of the loop
        if bad >= 0:
            bad_items = (~torch.isfinite(buf.x).flatten(1).all(dim=1)).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"non-finite latent at sampling step {bad} (t={int(self.tables.timesteps[bad])}) in batch items "
                f"{bad_items[:10]}; check the checkpoint's weights, or sample in float32"
            )
        return buf.x.clone()
