"""The pipeline: encode, denoise, decode. The reference backend is plain PyTorch and every fast path
(ldlm.runtimes.backends) is checked against it."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldlm.evaluation.rerank import candidate_seeds, check_reranking, choose
from ldlm.fast.buckets import batch_bucket
from ldlm.fast.step_tables import sampler_tables
from ldlm.inputs import (check_count, check_positive_int, check_seed, check_strength, check_temperature, check_texts,
                         nonfinite_items, resolve_device)
from ldlm.model.checkpoint import Components, load_checkpoint, load_config, save_checkpoint
from ldlm.model.config import ModelConfig
from ldlm.model.reverse import Condition
from ldlm.model.schedule import NoiseSchedule, add_noise
from ldlm.runtimes.backends import ENGINE_BACKENDS, EXPORT_BACKENDS, STATIC_DECODE_BACKENDS, resolve_backend
from ldlm.sampling.beam_search import BeamSearchConfig, beam_search
from ldlm.sampling.guidance import check_condition, check_guidance, encode_condition, guided_denoiser
from ldlm.sampling.nucleus import nucleus_decode
from ldlm.sampling.samplers import SAMPLERS, ItemNoise, resolve_sampling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"unsupported dtype {dtype}; choose one of {list(DTYPES)}")
    return dtype


DECODE_BATCH = 64  # items decoded together (each with its beams)

class Pipeline:
    """Latent diffusion for text. Lists in, results in input order; `progress=False` silences the bars."""

    def __init__(self, components: Components, device: str | torch.device = "cpu", backend: str = "auto",
                 dtype: str | torch.dtype = torch.float32, *, backend_reason: str | None = None):
        self.components = components
        self.config = components.config
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self._engine_cache: dict = {}  # fused samplers and static beam searches, built once per shape/setting
        # their static buffers (latents, noise, KV cache) serve one call at a time: threads sharing this pipeline
        # take turns on the engine (the reference and onnx paths keep no state between calls and run concurrently)
        self._engine_lock = threading.Lock()
        self.compile_times = None  # backend "compiled": seconds each shape's first (compiling) call took
        self.latent_mean = components.latent_mean.to(self.device)
        self.latent_std = components.latent_std.to(self.device)
        self.schedule = NoiseSchedule.from_config(self.config).to(self.device)
        if backend in EXPORT_BACKENDS:  # an export directory's graphs, already loaded (Pipeline.load)
            self.backend, self.backend_reason = backend, backend_reason or backend
            self.encoder, self.decoder, self.reverse = components.encoder, components.decoder, components.reverse
            return
        self.backend, self.backend_reason = resolve_backend(backend, self.device)
        if self.backend == "compiled":
            from ldlm.fast.compiled import CompileTimes
            from ldlm.paths import private_inductor_cache

            self.compile_times = CompileTimes()
            self.backend_reason += "; " + private_inductor_cache()  # it loads what it compiled as native code
        # the engine's folded step reads conditions by cross-attention; a joint-attention model's loop runs the
        # reference samplers (its condition tokens pass through every block at every step)
        self._engine_loop = self.config.condition is None or self.config.condition_attention == "cross"
        if not self._engine_loop and self.backend in ENGINE_BACKENDS:
            self.backend_reason += ("; this model reads its condition by joint attention, so its sampling loop runs "
                                    "the reference samplers (the engine's folded step reads cross-attention "
                                    "conditions); the decode is the engine's")
        if self.dtype != torch.float32 and self.backend in ("reference", "compiled"):
            raise ValueError(f"the {self.backend} backend runs in float32 only; use backend='fused' or 'cuda-graph' "
                             f"for {self.dtype}")
        self.encoder = components.encoder.to(self.device).eval()
        self.decoder = components.decoder.to(self.device).eval()
        self.reverse = components.reverse.to(self.device).eval()
        # the engine's copies in its dtype (the same modules in float32, the parity mode)
        self._engine_reverse = self.reverse if self.dtype == torch.float32 else copy.deepcopy(self.reverse).to(self.dtype)
        self._engine_decoder = self.decoder if self.dtype == torch.float32 else copy.deepcopy(self.decoder).to(self.dtype)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", backend: str = "auto",
             dtype: str | torch.dtype = torch.float32, onnx_options=None, *,
             trust_native_code: bool = False) -> Pipeline:
        from ldlm.export.manifest import is_export

        device = resolve_device(device)
        if not is_export(path):
            resolve_backend(backend, device)  # fail before loading weights
            return cls(load_checkpoint(path), device, backend, dtype)
        from ldlm.runtimes.onnx_runtime import load_export_components

        components, backend, why = load_export_components(path, device, resolve_dtype(dtype), onnx_options, backend,
                                                          trust_native_code=trust_native_code)
        return cls(components, device, backend, dtype, backend_reason=why)

    def save(self, path: str | Path) -> Path:
        if self.backend in EXPORT_BACKENDS:
            raise ValueError("an export holds no PyTorch weights to save; save from the checkpoint instead")
        return save_checkpoint(self.components, path)

    # --- latents ---------------------------------------------------------------------------------
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """texts -> raw latents (N, *latent_shape): (N, D), or (N, K, D) with K latent tokens; float32."""
        check_positive_int(batch_size, "batch_size")
        return self.encoder.encode(texts, batch_size=batch_size)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.latent_mean) / self.latent_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std + self.latent_mean

    def sampling(self, sampler: str | None, steps: int | None, eta: float = 0.0) -> tuple[str, int | None]:
        """The sampler and steps to run: the given ones, or the checkpoint's defaults (ModelConfig.sampler);
        raises, saying what to change, when they cannot run with this eta."""
        return resolve_sampling(self.config, sampler, steps, eta)

    def _generator(self, seed: int) -> torch.Generator:
        check_seed(seed)
        return torch.Generator(device=self.device).manual_seed(seed)

    def _run_sampler(self, x: torch.Tensor, *, sampler: str, steps: int | None, eta: float,
                     generator: torch.Generator | ItemNoise, start_t: int | None, progress: bool,
                     condition=None, guidance: float = 1.0) -> torch.Tensor:
        if self.backend in ENGINE_BACKENDS and self._engine_loop:
            # graphs are captured per batch bucket: pad, then drop the padding. The padded draw gives the real
            # rows the reference's noise: torch's CUDA Philox keys each element's value to its flat index and
            # advances the offset by the same amount for any tensor under ~1M elements (tests/test_gpu.py
            # checks padded batches against the reference)
            n = x.shape[0]
            if self.backend == "cuda-graph":
                bucket = batch_bucket(n, max(256, n))
                x = torch.cat([x, x.new_zeros(bucket - n, *x.shape[1:])])
                if condition is not None:  # padding rows read the null condition
                    condition = Condition.cat([condition, self.reverse.null(bucket - n)])
            with self._engine_lock:  # the result is a copy, free of the static buffers once returned
                run = self._fused_sampler(sampler, steps, eta, start_t)
                return run(x, generator, condition=condition, guidance=guidance)[:n].float()
        extra = {"eta": eta} if sampler == "ddim" else {}
        reverse = self._compiled_reverse() if self.backend == "compiled" else self.reverse
        return SAMPLERS[sampler](guided_denoiser(reverse, condition, guidance), x, self.schedule, steps=steps,
                                 generator=generator, disable=not progress, start_t=start_t, **extra)

    def _conditions(self, n: int, sources: list[str] | None, labels: list[str] | None,
                    guidance: float | None) -> float:
        """Check what a conditional call generates from (n items); returns the guidance weight to use."""
        guidance = self.config.guidance if guidance is None else guidance
        check_guidance(guidance)
        check_condition(self.config, n, sources, labels)
        return guidance

    def _condition(self, sources: list[str] | None, labels: list[str] | None, rows: slice):
        """The Condition of the items in `rows`, or None when the call has none."""
        if sources is None and labels is None:
            return None
        return encode_condition(self.reverse, self.encoder, device=self.device,
                                sources=sources[rows] if sources is not None else None,
                                labels=labels[rows] if labels is not None else None)

    def _fused_sampler(self, sampler: str, steps: int | None, eta: float, start_t: int | None):
        from ldlm.fast.fused_sampler import FusedSampler

        key = ("sampler", sampler, steps, eta, start_t)
        if key not in self._engine_cache:
            tables = sampler_tables(sampler, self.schedule.to("cpu"), steps=steps, eta=eta, start_t=start_t)
            self._engine_cache[key] = FusedSampler(self._engine_reverse, tables, device=self.device, dtype=self.dtype,
                                                   graphs=self.backend == "cuda-graph")
        return self._engine_cache[key]

    def _compiled_reverse(self):
        from ldlm.fast.compiled import CompiledReverse

        if "reverse" not in self._engine_cache:
            self._engine_cache["reverse"] = CompiledReverse(self.reverse, self.compile_times)
        return self._engine_cache["reverse"]

    def _beam_searcher(self, batch: int, search: BeamSearchConfig):
        from ldlm.fast.static_beam_search import StaticBeamSearch

        key = ("beam", batch, search)
        if key not in self._engine_cache:
            searcher = StaticBeamSearch(self._engine_decoder, batch, search, graphs=self.backend == "cuda-graph")
            if self.backend == "compiled":
                from ldlm.fast.compiled import compile_beam_step

                compile_beam_step(searcher, self.compile_times)
            self._engine_cache[key] = searcher
        return self._engine_cache[key]

    @torch.no_grad()
    def sample_latents(self, n: int, *, steps: int | None = None, sampler: str | None = None, eta: float = 0.0,
                       seed: int = 0, seeds: list[int] | None = None, batch_size: int = 256,
                       sources: list[str] | None = None, labels: list[str] | None = None,
                       guidance: float | None = None, temperature: float = 1.0,
                       progress: bool = True) -> torch.Tensor:
        """n raw latents (n, *latent_shape) from Gaussian noise. One generator seeded with `seed` draws x_T, then
        each step's noise, batch after batch: the same (n, seed, batch_size) gives the same latents.
        With `seeds` (one per item), each item draws from its own generator instead (ldlm.sampling.samplers.ItemNoise):
        its latent depends on its seed alone, whatever the batch. sampler None: the checkpoint's default.
        A conditional model samples item i from sources[i] (or labels[i]) with classifier-free guidance weight
        `guidance` (None: the checkpoint's); without them, unconditionally (its null condition).
        temperature: x_T is `temperature` times the drawn noise (0 to MAX_TEMPERATURE), Glow's temperature for the
        sampler's starting point, the only randomness of DPM-Solver++ and DDIM at eta 0 (DDPM's and DDIM's later
        noise keeps its scale). Below 1 it trades variety for typical texts (E2E: bench/results/quality.md)."""
        out = list(self._latent_batches(n, steps=steps, sampler=sampler, eta=eta, seed=seed, seeds=seeds,
                                        batch_size=batch_size, sources=sources, labels=labels, guidance=guidance,
                                        temperature=temperature, progress=progress))
        return torch.cat(out) if out else torch.empty(0, *self.config.latent_shape, device=self.device)

    def _latent_batches(self, n: int, *, steps, sampler, eta, seed, seeds, batch_size, sources, labels, guidance,
                        temperature, progress) -> Iterator[torch.Tensor]:
        """sample_latents' batches (batch_size, *latent_shape) one at a time, all checked before the first."""
        check_count(n)
        check_positive_int(batch_size, "batch_size")
        check_temperature(temperature)
        sampler, steps = self.sampling(sampler, steps, eta)
        guidance = self._conditions(n, sources, labels, guidance)
        if seeds is not None and len(seeds) != n:
            raise ValueError(f"seeds has {len(seeds)} entries for {n} samples: give one seed per sample")
        generator = self._generator(seed)

        def batches() -> Iterator[torch.Tensor]:
            nonlocal generator
            for start in range(0, n, batch_size):
                size = min(batch_size, n - start)
                if seeds is not None:
                    generator = ItemNoise(seeds[start : start + size])
                    x = generator.randn(self.config.latent_shape, self.device)
                else:
                    x = torch.randn(size, *self.config.latent_shape, generator=generator, device=self.device)
                if temperature != 1.0:
                    x = x * temperature
                condition = self._condition(sources, labels, slice(start, start + size))
                z = self._run_sampler(x, sampler=sampler, steps=steps, eta=eta, generator=generator,
                                      start_t=None, progress=progress, condition=condition, guidance=guidance)
                yield self.denormalize(z)

        return batches()

    # --- text ------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, num_beams: int = 4, max_new_tokens: int | None = None,
               no_repeat_ngram_size: int = 3, batch_size: int = DECODE_BATCH, top_p: float | None = None,
               seed: int = 0, progress: bool = True) -> list[str]:
        """Raw latents (N, *latent_shape) -> N texts, by beam search; with top_p, by nucleus sampling
        (ldlm.sampling.nucleus, seeded by `seed`) instead."""
        if tuple(latents.shape[1:]) != self.config.latent_shape:
            raise ValueError(f"latents must be (N, {', '.join(map(str, self.config.latent_shape))}), "
                             f"got {tuple(latents.shape)}")
        check_positive_int(batch_size, "batch_size")
        if max_new_tokens is not None:
            check_positive_int(max_new_tokens, "max_new_tokens")
        check_seed(seed)
        search = BeamSearchConfig(num_beams=num_beams, max_new_tokens=max_new_tokens or self.config.max_text_tokens,
                                  no_repeat_ngram_size=no_repeat_ngram_size)
        return self._decode(latents, search, top_p=top_p, generator=torch.Generator().manual_seed(seed),
                            batch_size=batch_size, progress=progress)

    def _decode(self, latents: torch.Tensor, search: BeamSearchConfig, *, top_p: float | None,
                generator: torch.Generator, batch_size: int, progress: bool, first_item: int = 0) -> list[str]:
        """decode's work on checked arguments; nucleus sampling draws from `generator`, which a caller decoding
        batch after batch passes on, so the draws are those of one call over all of them. `first_item`: the
        number of latents[0] in what the caller decodes, for messages."""
        bad = nonfinite_items(latents)
        if bad:
            raise ValueError(f"decode: latents of items {[first_item + i for i in bad[:10]]} hold NaN or inf; pass "
                             "finite latents")
        texts = []
        for start in tqdm(range(0, latents.shape[0], batch_size), desc="decode", disable=not progress, leave=False):
            batch = latents[start : start + batch_size].to(self.device, torch.float32)
            if top_p is not None:
                token_ids = nucleus_decode(self.decoder, batch, top_p=top_p, max_new_tokens=search.max_new_tokens,
                                           generator=generator)
            elif self.backend in EXPORT_BACKENDS:  # the reference search on the export's graphs
                token_ids = self.decoder.beam_search(batch, search)
            elif self.backend not in STATIC_DECODE_BACKENDS:
                token_ids = beam_search(self.decoder, batch, search)
            else:
                with self._engine_lock:
                    token_ids = self._beam_searcher(batch_bucket(len(batch), batch_size), search)(batch)
            for ids in token_ids:
                texts.append(self.decoder.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return texts

    def decoding_settings(self, decoding: str | None, top_p: float | None,
                          num_beams: int) -> tuple[BeamSearchConfig, float | None]:
        """(the beam search's settings, the nucleus' top_p or None for beam search) of generate's decoding
        arguments: decoding "beam" or "nucleus"; None: the checkpoint's default (ModelConfig.decoding), or nucleus
        when top_p is given."""
        search = BeamSearchConfig(num_beams=num_beams, max_new_tokens=self.config.max_text_tokens)
        decoding = decoding or ("nucleus" if top_p is not None else self.config.decoding)
        if decoding not in ("beam", "nucleus"):
            raise ValueError(f"decoding must be 'beam' or 'nucleus', got {decoding!r}")
        return search, (top_p if top_p is not None else self.config.top_p) if decoding == "nucleus" else None

    def step_reverse(self):
        """The reverse transformer as one sampling step calls it on this backend, (x_t, t[, x0_prev][, condition=])
        -> x0_hat, for loops that step rows at timesteps of their own (ldlm.serving): the compiled module on
        `compiled`, the export's graph on onnx and aoti, the module in the engine's dtype on the engine backends
        (whose fused loop steps a whole batch through one shared step table), else the reference module."""
        if self.backend == "compiled":
            return self._compiled_reverse()
        if self.backend in ENGINE_BACKENDS:
            return self._engine_reverse
        return self.reverse

    def slot_decoder(self):
        """A decoder for the beam search whose items join and leave between tokens (ldlm.fast.slot_decode), or None
        where this backend decodes batch by batch only: the reference decoder on `reference`, the export's graphs
        on onnx and aoti. The static-KV search of the compiled and engine backends keeps one batch to the end
        (its shapes fixed for compiled graphs and CUDA graphs)."""
        if self.backend == "reference":
            from ldlm.fast.slot_decode import TorchSlotDecoder

            return TorchSlotDecoder(self.decoder)
        if self.backend in EXPORT_BACKENDS:
            from ldlm.runtimes.onnx_parts import OnnxSlotDecoder

            return OnnxSlotDecoder(self.decoder)
        return None

    def generate(self, n: int, steps: int | None = None, sampler: str | None = None, seed: int = 0, *,
                 eta: float = 0.0, num_beams: int = 4, decoding: str | None = None, top_p: float | None = None,
                 temperature: float = 1.0, batch_size: int = 256, progress: bool = True) -> list[str]:
        """n unconditional samples: noise -> reverse diffusion -> decode. decoding: "beam" (search) or "nucleus"
        (sampling with top_p); None: the checkpoint's default (ModelConfig.decoding), or nucleus when top_p is
        given. temperature: the starting noise's scale (sample_latents)."""
        return [text for batch in self.generate_batches(n, steps, sampler, seed, eta=eta, num_beams=num_beams,
                                                        decoding=decoding, top_p=top_p, temperature=temperature,
                                                        batch_size=batch_size, progress=progress) for text in batch]

    def generate_batches(self, n: int, steps: int | None = None, sampler: str | None = None, seed: int = 0, *,
                         eta: float = 0.0, num_beams: int = 4, decoding: str | None = None,
                         top_p: float | None = None, batch_size: int = 256, seeds: list[int] | None = None,
                         sources: list[str] | None = None, labels: list[str] | None = None,
                         guidance: float | None = None, temperature: float = 1.0,
                         progress: bool = True) -> Iterator[list[str]]:
        """generate(n, ...), or with sources / labels generate_from(...), a batch of `batch_size` texts at a
        time: the same texts in the same order, holding one batch, for counts too large to keep (`ldlm generate`
        prints each batch as it ends). Everything is checked before the first batch runs."""
        search, nucleus = self.decoding_settings(decoding, top_p, num_beams)
        latents = self._latent_batches(n, steps=steps, sampler=sampler, eta=eta, seed=seed, seeds=seeds,
                                       batch_size=batch_size, sources=sources, labels=labels, guidance=guidance,
                                       temperature=temperature, progress=progress)
        generator = torch.Generator().manual_seed(seed)  # the decode's draws continue from batch to batch
        # the decode's own batches split each sampled batch as they split all of them (batch_size is a multiple
        # of DECODE_BATCH by default), so nucleus draws match a single decode of everything
        return (self._decode(batch, search, top_p=nucleus, generator=generator, batch_size=DECODE_BATCH,
                             progress=progress, first_item=i * batch_size) for i, batch in enumerate(latents))

    def generate_from(self, sources: list[str] | None = None, *, labels: list[str] | None = None,
                      guidance: float | None = None, seed: int = 0, seeds: list[int] | None = None,
                      sampler: str | None = None, steps: int | None = None, eta: float = 0.0, num_beams: int = 4,
                      decoding: str | None = None, top_p: float | None = None, temperature: float = 1.0,
                      batch_size: int = 256, candidates: int = 1, rerank: str = "mbr",
                      progress: bool = True) -> list[str]:
        """One text per source text (or per label, for a class-conditional model), in input order: reverse
        diffusion from noise reading the condition, with classifier-free guidance weight `guidance` (0
        unconditional, 1 conditional, above 1 guided; None: the checkpoint's default), then decode. Noise as
        in sample_latents: from `seed`, or each item from its own entry of `seeds`, scaled by `temperature`.

        candidates: sample this many texts per item in the same loop (each a row of its own) and keep one, chosen
        by `rerank` (ldlm.evaluation.rerank): "mbr" (the one agreeing most with the others) or "slots" (E2E
        meaning representations: the fewest slot errors against the source, then MBR). Candidate j of item i
        draws its noise from rerank.candidate_seeds: candidate 0 is what the call with `seeds` gives."""
        given = sources if sources is not None else labels
        if given is None:
            raise ValueError("pass sources=[...] (or labels=[...] for a class-conditional model)")
        if isinstance(given, str):
            raise TypeError("pass a list, not a single string: wrap it as [text]")
        check_reranking(candidates, rerank, sources)
        k = candidates
        if k > 1:  # item i's candidates are items i * k to i * k + k - 1 of one call
            seeds = candidate_seeds(len(given), k, seed, seeds)
            sources, labels = (None if items is None else [item for item in items for _ in range(k)]
                               for items in (sources, labels))
        batches = self.generate_batches(len(given) * k, steps, sampler, seed, eta=eta, num_beams=num_beams,
                                        decoding=decoding, top_p=top_p, batch_size=batch_size, seeds=seeds,
                                        sources=sources, labels=labels, guidance=guidance, temperature=temperature,
                                        progress=progress)
        texts = [text for batch in batches for text in batch]
        if k == 1:
            return texts
        groups = [texts[i * k : (i + 1) * k] for i in range(len(given))]
        return [group[choose(group, rerank, None if sources is None else sources[i * k])]
                for i, group in enumerate(groups)]

    def warmup(self, batch_sizes: tuple[int, ...] = (1,), *, sampler: str | None = None, steps: int | None = None,
               num_beams: int = 4, decoding: str | None = None) -> dict[int, float]:
        """Generate once at each batch size, so its static buffers are allocated and, on the cuda-graph backend,
        its graphs captured: what the first call of a size otherwise pays (a server's start-up, as vLLM captures
        its graphs). Returns the seconds each size took. The other arguments: as generate will be called."""
        seconds = {}
        for n in batch_sizes:
            start = time.perf_counter()
            self.generate(n, steps=steps, sampler=sampler, num_beams=num_beams, decoding=decoding, progress=False)
            seconds[n] = time.perf_counter() - start
        return seconds

    def reconstruct(self, texts: list[str], *, num_beams: int = 4, progress: bool = True) -> list[str]:
        """Encode then decode: what the decoder recovers from a clean latent."""
        return self.decode(self.encode(texts), num_beams=num_beams, progress=progress)

    @torch.no_grad()
    def vary(self, texts: list[str], strength: float = 0.3, steps: int | None = None, sampler: str | None = None,
             seed: int = 0, *, eta: float = 0.0, num_beams: int = 4, seeds: list[int] | None = None,
             sources: list[str] | None = None, labels: list[str] | None = None, guidance: float | None = None,
             progress: bool = True) -> list[str]:
        """Encode, noise the latent to t = strength * T, denoise from there, decode (SDEdit, Meng et al. 2022).

        strength 0 returns the reconstruction; 1 starts from (almost) pure noise. `seeds`: one per text, each
        text drawing its noise from its own generator (as in sample_latents). A conditional model denoises
        towards sources[i] (or labels[i]) with guidance, as in sample_latents.
        """
        BeamSearchConfig(num_beams=num_beams)
        latents = self.vary_latents(texts, strength, steps, sampler, seed, eta=eta, seeds=seeds, sources=sources,
                                    labels=labels, guidance=guidance, progress=progress)
        return self.decode(latents, num_beams=num_beams, progress=progress)

    @torch.no_grad()
    def vary_latents(self, texts: list[str], strength: float = 0.3, steps: int | None = None, sampler: str | None = None,
                     seed: int = 0, *, eta: float = 0.0, seeds: list[int] | None = None,
                     sources: list[str] | None = None, labels: list[str] | None = None, guidance: float | None = None,
                     progress: bool = True) -> torch.Tensor:
        """The latents `vary` decodes: (N, *latent_shape)."""
        sampler, steps = self.sampling(sampler, steps, eta)
        check_texts(texts)
        check_strength(strength)
        check_seed(seed)
        guidance = self._conditions(len(texts), sources, labels, guidance)
        if seeds is not None and len(seeds) != len(texts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(texts)} texts: give one seed per text")
        latents = self.encode(texts)
        start_t = min(self.schedule.num_timesteps - 1, round(strength * self.schedule.num_timesteps))
        if strength > 0 and texts:
            generator = ItemNoise(seeds) if seeds is not None else self._generator(seed)
            z0 = self.normalize(latents)
            t = torch.full((z0.shape[0],), start_t, device=self.device, dtype=torch.long)
            if seeds is not None:
                noise = generator.randn(tuple(z0.shape[1:]), self.device)
            else:
                noise = torch.randn(z0.shape, generator=generator, device=self.device)
            x = add_noise(self.schedule, z0, t, noise)
            if sampler == "ddpm":
                steps = None  # DDPM runs every timestep from start_t
            condition = self._condition(sources, labels, slice(0, len(texts)))
            latents = self.denormalize(self._run_sampler(x, sampler=sampler, steps=steps, eta=eta,
                                                         generator=generator, start_t=start_t, progress=progress,
                                                         condition=condition, guidance=guidance))
        return latents


def read_model_config(path: str | Path) -> ModelConfig:
    """The model config of a checkpoint or an export directory, without loading any weights."""
    from ldlm.export.manifest import is_export, read_manifest

    if is_export(path):
        return ModelConfig.from_dict(read_manifest(path, verify_hashes=False)["model"])
    return load_config(path)


def load(path: str | Path, device: str | torch.device = "cpu", backend: str = "auto",
         dtype: str | torch.dtype = torch.float32, onnx_options=None, *, trust_native_code: bool = False) -> Pipeline:
    """Load a checkpoint directory written by `ldlm train` (or `Pipeline.save`), or an export directory written
    by `ldlm export` (backend 'onnx', or 'aoti' for `--format aoti`).

    backend: see ldlm.runtimes.backends. dtype: the engine's compute dtype (float32, the parity mode; bfloat16;
    float16); the reference backend is float32 only; onnx runs the float32 or float16 graphs.
    onnx_options: ldlm.OnnxOptions (provider, threads, optimization level, int8 reverse).
    trust_native_code: an AOTInductor export is native code that runs when loaded; without this flag it loads
    only if this user exported it on this machine (its manifest signed with this user's key), as transformers
    asks trust_remote_code before running a model's own code. Checkpoints and ONNX exports are data: no flag."""
    return Pipeline.load(path, device, backend, dtype, onnx_options, trust_native_code=trust_native_code)
