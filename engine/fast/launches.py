"""Kernels the engine launches per sampling step and per decoded token, counted on the CPU: every ATen op that
does work (views and allocations left out), plus the engine's Triton kernels, each counted once and run as its
torch equivalent. On a GPU each is a launch, which a CUDA graph replays without the host but still runs one
after another, so the count bounds a graphed step as much as its FLOPs do. The ops are the same on a GPU, where
a few (attention) may launch more than one kernel each. bench/gpu/step_kernels.py prints them; bench/gpu/latency.py
records the totals beside its timings.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ldlm.fast.fused_sampler import FusedSampler
from ldlm.fast.static_beam_search import StaticBeamSearch
from ldlm.fast.step_tables import ddpm_tables
from ldlm.kernels.reference import add_then_norm, beam_head_reference, modules_linear
from ldlm.model.config import ModelConfig
from ldlm.model.decoder import LatentDecoder
from ldlm.model.reverse import ReverseTransformer
from ldlm.model.schedule import NoiseSchedule
from ldlm.sampling.beam_search import BeamSearchConfig

NO_KERNEL = {"view", "expand", "as_strided", "unsqueeze", "slice", "select", "t", "transpose", "permute", "split",
             "split_with_sizes", "_reshape_alias", "alias", "empty", "empty_strided", "empty_like", "detach",
             "_unsafe_view", "unbind", "squeeze", "lift_fresh"}


class CountOps(TorchDispatchMode):
    """Counts the ATen ops that run inside it, by name."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in NO_KERNEL:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _counted(counter: CountOps, name: str, torch_equivalent, kernels: int = 1):
    """A Triton function of `kernels` kernels, counted under `name`; its torch equivalent runs uncounted."""
    def kernel(*args, **kwargs):
        counter.ops[f"{name} (Triton)"] += kernels
        with _disable_current_modes():
            return torch_equivalent(*args, **kwargs)
    return kernel


def step_kernels(preset: str, batch: int, *, fused_blocks: bool = False) -> Counter:
    """Ops of one sampling step of the engine's loop (DDPM, a noise draw); fused_blocks: every matmul of the
    model with its neighbours as one kernel (ldlm.kernels.fused_linear)."""
    config = ModelConfig.from_preset(preset)
    sampler = FusedSampler(ReverseTransformer(config).eval(), ddpm_tables(NoiseSchedule.from_config(config)),
                           device="cpu", graphs=False, fused_norms=True, fused_blocks=fused_blocks)  # as on a GPU
    counter = CountOps()
    sampler.fused_update = lambda *args, **kwargs: None  # counted as one kernel below
    sampler.denoiser.add_norm = _counted(counter, "add_layer_norm", add_then_norm)
    if fused_blocks:
        sampler.denoiser.linear = _counted(counter, "fused_linear", modules_linear)
    buf = sampler._buffers_for((batch, *config.latent_shape))
    with torch.no_grad(), counter:
        sampler._one_step(buf, torch.Generator().manual_seed(0), draw=True, from_table=False)
    counter.ops["fused_update (Triton)"] += 1
    return counter.ops


def token_searcher(decoder: LatentDecoder, batch: int, num_beams: int = 4, attention: str = "sdpa", *,
                   fused_blocks: bool = False, fused_beam_step: bool = False) -> StaticBeamSearch:
    """The engine's static-KV beam search as on a GPU (fused norms, or fused blocks; the fused beam step), for
    timing or counting its tokens: up to 64 new tokens, fewer where the decoder's positions end (the cache's
    length changes no kernel count)."""
    tokens = min(64, decoder.gpt2.config.n_positions - decoder.config.n_prefix)
    config = BeamSearchConfig(num_beams=num_beams, max_new_tokens=tokens)
    return StaticBeamSearch(decoder, batch_size=batch, config=config, fused_norms=True, attention=attention,
                            fused_blocks=fused_blocks, fused_beam_step=fused_beam_step)


def decode_kernels(decoder: LatentDecoder, batch: int, num_beams: int = 4, attention: str = "sdpa", *,
                   fused_blocks: bool = False, fused_beam_step: bool = False) -> Counter:
    """Ops of one token of the engine's static-KV beam decode (GPT-2 step, beam selection, cache reorder), for
    a decoder on the CPU; attention as ldlm.fast.static_gpt2's; fused_blocks: each layer's matmuls with their norms,
    biases, GELU and residuals as ldlm.kernels.fused_linear launches; fused_beam_step: the LM head to the
    top-2K as ldlm.kernels.beam_head's two kernels."""
    search = token_searcher(decoder, batch, num_beams, attention, fused_blocks=fused_blocks,
                            fused_beam_step=fused_beam_step)
    counter = CountOps()
    search.model.add_norm = _counted(counter, "add_layer_norm", add_then_norm)
    if fused_blocks:
        search.model.linear = _counted(counter, "fused_linear", modules_linear)
    if fused_beam_step:
        search._beam_head = _counted(counter, "beam_head", beam_head_reference, kernels=2)
    if attention == "indirect":
        from ldlm.kernels.beam_attention import beam_attention_reference  # (its module imports Triton)

        search.model._beam_attention = _counted(counter, "beam_attention", beam_attention_reference)
    with torch.no_grad():
        state = search._prefill()
        with counter:
            search.decode_step(state)
    return counter.ops
