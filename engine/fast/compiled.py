"""The `compiled` backend: the reference modules through `torch.compile` (Inductor; CPU or CUDA).

- The reverse transformer runs the reference samplers' steps, compiled once per shape bucket: rows padded to
  the next power of two (ldlm.fast.buckets), a condition's tokens to the next power of two with the
  padding masked, so a sampling loop of any length compiles at most once per bucket and never recompiles
  inside the loop. The padding is added inside the denoiser, so the sampler draws exactly the reference's
  noise.
- The beam decode is the engine's static-KV beam search (ldlm.fast.static_beam_search) with its token step
  compiled: fixed shapes per batch bucket and the step counter on the device (two variants, one per KV-cache
  buffer it reads).

Compiled code is cached on disk by Inductor (its FX graph cache, under TORCHINDUCTOR_CACHE_DIR), so a second
process with the same model and shapes loads kernels instead of generating them; `Pipeline.compile_times`
records what the first call of each shape cost in this process.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import torch

from ldlm.fast.buckets import next_power_of_two
from ldlm.model.reverse import Condition, ReverseTransformer


def compiler_missing() -> str | None:
    """Why Inductor cannot compile for the CPU here (no C++ compiler), or None."""
    names = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    return None if any(n and shutil.which(n) for n in names) else "no C++ compiler (g++, clang++) on PATH"


class CompileTimes:
    """Seconds the first call of each compiled shape took (compile included), by a readable key."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def timed(self, key: str, run):
        """run(); its first call for `key` is timed, and compiles alone (threads sharing a pipeline wait for it:
        compiling is not thread-safe), later ones run concurrently."""
        if key in self.seconds:
            return run()
        with self._lock:
            if key in self.seconds:
                return run()
            start = time.perf_counter()
            out = run()
            self.seconds[key] = time.perf_counter() - start
            return out


class CompiledReverse:
    """The reverse transformer as the samplers call it, (x_t, t[, x0_prev][, condition=]) -> x0_hat, through
    `torch.compile(dynamic=False)` on bucketed shapes. `config` and `null` are the module's."""

    def __init__(self, reverse: ReverseTransformer, times: CompileTimes, mode: str | None = None):
        self.config = reverse.config
        self.null = reverse.null
        self.project_condition = reverse.project_condition  # eager: once per sampling run
        self.times = times
        self._compiled = torch.compile(reverse, dynamic=False, fullgraph=True, mode=mode)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, x0_prev: torch.Tensor | None = None,
                 condition: Condition | None = None) -> torch.Tensor:
        n = x_t.shape[0]
        rows = next_power_of_two(n)

        def pad(z: torch.Tensor) -> torch.Tensor:  # rows n -> rows, copies of row 0 (finite, dropped below)
            return z if rows == n else torch.cat([z, z[:1].expand(rows - n, *z.shape[1:])])

        args = [pad(x_t), pad(t)]
        if self.config.self_condition:
            args.append(pad(torch.zeros_like(x_t) if x0_prev is None else x0_prev))
        kwargs = {}
        key = f"reverse rows={rows}"
        if condition is not None:
            length = next_power_of_two(condition.tokens.shape[1])
            c = condition.padded(length)
            kwargs["condition"] = Condition(pad(c.tokens), pad(c.mask), c.projected)
            key += f" condition={length}{' projected' if c.projected else ''}"
        return self.times.timed(key, lambda: self._compiled(*args, **kwargs))[:n]


def compile_beam_step(search, times: CompileTimes, mode: str | None = None) -> None:
    """Replace a StaticBeamSearch's token step by its compiled version (in place)."""
    compiled = torch.compile(search.decode_step, dynamic=False, fullgraph=True, mode=mode)
    keys = [f"beam step rows={search.B * search.K} cache={parity}" for parity in (0, 1)]  # per KV buffer read

    def step(state) -> None:
        times.timed(keys[search.model.current], lambda: compiled(state))

    search.decode_step = step
