"""The pipeline's networks on exported graphs: the encoder, the reverse transformer (with its condition), and
the decoder with its KV cache and the beam search's step (its bookkeeping in ldlm's C kernel on the CPU)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ldlm.fast.native_beam_search import native_beam_search
from ldlm.fast.slot_decode import SlotKV
from ldlm.kernels.native import MAX_BEAMS, RowGather, load_note, unavailable_reason
from ldlm.model.config import ModelConfig
from ldlm.model.encoder import collect_token_states, encode_texts
from ldlm.model.reverse import Condition
from ldlm.runtimes.onnx_session import Graph, OnnxOptions
from ldlm.sampling.beam_search import BeamSearchConfig, beam_search

# padded condition tokens a second run of the reverse graph must save to pay for itself: on the 2-core CPU (AMD
# EPYC, AVX-512 VNNI, one thread), a guided step of the E2E model (null rows padded from 1 to 43 tokens) in an
# export without condition_kv gained 1.06x at 4 items, 1.22x at 8 and 1.51x at 64 (int8), and three items (126
# tokens) do not pay (bench/results/cpu.md, 2026-12-07, "the ONNX export projects the condition once")
SPLIT_MIN_TOKENS = 128


class OnnxEncoder:
    """texts -> latents (N, *latent_shape) with the exported encoder graph; the same batching as LatentEncoder."""

    def __init__(self, graph: Graph, tokenizer, max_tokens: int, latent_shape: tuple[int, ...], device: torch.device):
        self.graph, self.tokenizer, self.max_tokens, self.latent_shape = graph, tokenizer, max_tokens, latent_shape
        self.hidden_size = latent_shape[-1]  # the encoder's width: the latent is its (pooled) hidden states
        self.device = device

    def _pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        latent = torch.empty(input_ids.shape[0], *self.latent_shape, device=self.device)
        self.graph.run({"input_ids": input_ids, "attention_mask": attention_mask}, {"latent": latent})
        return latent

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        return encode_texts(texts, tokenizer=self.tokenizer, max_tokens=self.max_tokens, latent_shape=self.latent_shape,
                            pooled=self._pooled, device=self.device, batch_size=batch_size)

    @torch.no_grad()
    def token_states(self, texts: list[str], batch_size: int = 64) -> list[torch.Tensor]:
        """texts -> each text's last hidden states over its real tokens, (L_i, D) float32 on the CPU, as
        LatentEncoder.token_states: a text-conditioned model's sources."""
        if "token_states" not in self.graph.shapes:
            raise ValueError(f"{self.graph.path.name} returns no token states: this export's model is not "
                             "conditioned on a source text")

        def hidden(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            B, L = input_ids.shape
            latent = torch.empty(B, *self.latent_shape, device=self.device)
            states = torch.empty(B, L, self.hidden_size, device=self.device)
            self.graph.run({"input_ids": input_ids, "attention_mask": attention_mask},
                           {"latent": latent, "token_states": states})
            return states

        return collect_token_states(texts, tokenizer=self.tokenizer, max_tokens=self.max_tokens, hidden=hidden,
                                    device=self.device, batch_size=batch_size)


def _rows(index: torch.Tensor) -> torch.Tensor | slice:
    """Row indices (N,) as a slice where they are consecutive (as a guided batch's halves are): its rows are then
    views, not copies (a projected condition is n_layers x 2 times the tokens' width)."""
    first, last = int(index[0]), int(index[-1])
    return slice(first, last + 1) if last - first + 1 == len(index) else index


class OnnxReverse:
    """The reverse transformer graph as a denoiser: (x_t (B, D), t (B,)[, x0_prev][, condition]) -> x0_hat
    (B, D); for a conditional model also what ldlm.sampling.guidance reads of a ReverseTransformer: embed_condition
    (the condition graph), null (the manifest's learned null condition) and, for a cross-attention model,
    project_condition (the condition_kv graph: the reverse graph reads each block's keys and values, projected
    once per sampling run; a condition passed unprojected is projected at the call)."""

    def __init__(self, graph: Graph, config: ModelConfig, condition_graph: Graph | None = None,
                 null_condition: torch.Tensor | None = None, condition_kv_graph: Graph | None = None, *,
                 static_inputs: bool = False):
        """static_inputs: bind each input shape's run once to buffers of its own and copy every call's inputs
        into them (what ORT's CUDA graphs need: a graph replays the addresses it captured; one graph id a
        shape). Calls then take turns on the buffers; without it each call binds its own tensors and calls
        from several threads run at once."""
        self.graph, self.config = graph, config
        self.condition_graph, self.null_condition = condition_graph, null_condition  # (1, d_model) float32
        self.condition_kv_graph = condition_kv_graph
        self._null_read: torch.Tensor | None = None  # the null token as the reverse graph reads it, (1, width)
        self.static_inputs = static_inputs
        self._static: dict[tuple, tuple[dict[str, torch.Tensor], torch.Tensor, Callable[[], None]]] = {}
        self._static_lock = threading.Lock()

    def _run_static(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """inputs copied into this shape's bound buffers, one run (captured the first time in a CUDA-graph
        session, replayed after), the output copied out (a multistep sampler keeps the previous x0_hat)."""
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())
        with self._static_lock:
            if key not in self._static:
                buffers = {name: torch.empty_like(t, memory_format=torch.contiguous_format)
                           for name, t in inputs.items()}
                out = torch.empty_like(buffers["x_t"])
                run = self.graph.bind(buffers, {"x0_hat": out}, graph_id=len(self._static))
                self._static[key] = (buffers, out, run)
            buffers, out, run = self._static[key]
            for name, tensor in inputs.items():
                buffers[name].copy_(tensor)
            run()
            return out.clone()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, x0_prev: torch.Tensor | None = None,
                 condition: Condition | None = None) -> torch.Tensor:
        groups = self._length_groups(condition, x_t.device)
        if groups is None:
            return self._run(x_t, t, x0_prev, condition)
        out = torch.empty(x_t.shape, dtype=torch.float32, device=x_t.device)
        for rows in groups:
            prev = None if x0_prev is None else x0_prev[rows]
            out[rows] = self._run(x_t[rows], t[rows], prev, condition.rows(rows).trimmed())
        return out

    def _length_groups(self, condition: Condition | None, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """The rows of long conditions and the short ones, (long, short) indices, when running them apart pays;
        None to run the batch as one. An export without the condition_kv graph (a joint-attention model, or a
        cross-attention one exported before that graph) projects every condition token of every row, padding
        included, at every step: a guided batch pads its null rows (one token) to the sources' length (about 40
        MiniLM tokens on E2E). A second run costs a fixed overhead, paid back from about SPLIT_MIN_TOKENS padded
        tokens saved. Not for a projected condition (the padding is then only read: a second run gained nothing,
        bench/results/cpu.md, 2026-12-07), nor on a GPU (not compute-bound here; a CUDA graph wants one shape)."""
        if condition is None or condition.projected or self.static_inputs or device.type != "cpu":
            return None
        lengths = condition.mask.sum(1)  # (B,) real tokens a row
        cuts = lengths.unique()[:-1]  # (U,) the short group: the rows of at most `cut` tokens, padded to it
        if not len(cuts):
            return None
        saved = (lengths[None, :] <= cuts[:, None]).sum(1) * (condition.tokens.shape[1] - cuts)  # (U,) tokens
        best = int(saved.argmax())
        if int(saved[best]) < SPLIT_MIN_TOKENS:
            return None
        short = lengths <= cuts[best]
        return tuple(_rows(group.nonzero().squeeze(1)) for group in (~short, short))

    def _run(self, x_t: torch.Tensor, t: torch.Tensor, x0_prev: torch.Tensor | None,
             condition: Condition | None) -> torch.Tensor:
        """One run of the graph over the batch."""
        inputs = {"x_t": x_t.float(), "t": t.float()}
        if self.config.self_condition:
            inputs["x0_prev"] = torch.zeros_like(inputs["x_t"]) if x0_prev is None else x0_prev.float()
        if self.config.condition is not None:
            condition = self._read(condition, x_t.shape[0])
            inputs["condition_kv" if condition.projected else "condition_tokens"] = condition.tokens.float()
            inputs["condition_mask"] = condition.mask.long()
        elif condition is not None:
            raise ValueError("this reverse transformer is unconditional: it takes no condition")
        if self.static_inputs:
            return self._run_static(inputs)
        out = torch.empty_like(inputs["x_t"])
        self.graph.run(inputs, {"x0_hat": out})
        return out

    def _read(self, condition: Condition | None, batch: int) -> Condition:
        """The condition as the reverse graph reads it (None: the null condition of `batch` rows)."""
        if self.condition_kv_graph is None:
            if condition is not None and condition.projected:
                raise ValueError("this export's reverse graph reads a condition's tokens, not a projected condition "
                                 "(pass it unprojected; a cross-attention model exported again reads projections)")
            return condition if condition is not None else self.null(batch)
        if condition is None:
            if self._null_read is None:
                self._null_read = self.project_condition(self.null(1)).tokens[0]  # (1, width)
            return Condition.repeated(self._null_read, batch, projected=True)
        return self.project_condition(condition)

    def embed_condition(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> Condition:
        """As ReverseTransformer.embed_condition: label ids (B,), or token states (B, L, D) with their mask."""
        if self.condition_graph is None:
            raise ValueError("this reverse transformer is unconditional: it takes no condition")
        label = self.config.condition == "label"
        length = 1 if label else states.shape[1]
        tokens = torch.empty(states.shape[0], length, self.config.d_model, device=states.device)
        self.condition_graph.run({"states": states.long() if label else states.float()}, {"condition_tokens": tokens})
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=states.device)
        return Condition(tokens, mask.bool())

    def project_condition(self, condition: Condition) -> Condition:
        """As ReverseTransformer.project_condition, by the export's condition_kv graph: (B, L, d_model) tokens ->
        (B, L, n_layers * 2 * d_model), each block's keys and values. An export without that graph (a
        joint-attention model, or a cross-attention one exported before it existed) reads the tokens and
        projects them itself at every step: the condition comes back as it is."""
        if self.condition_kv_graph is None or condition.projected:
            return condition
        B, L, _ = condition.tokens.shape
        kv = torch.empty(B, L, 2 * self.config.n_layers * self.config.d_model, device=condition.tokens.device)
        self.condition_kv_graph.run({"condition_tokens": condition.tokens.float()}, {"condition_kv": kv})
        return Condition(kv, condition.mask, projected=True)

    def null(self, batch: int) -> Condition:
        return Condition.repeated(self.null_condition, batch)


class OnnxCache:
    """The decoder's static KV cache for the step graph: keys (L, R, H, hd, C), stored transposed so the graph's
    q @ k reads them in place, and values (L, R, H, C, hd), one tensor each so that a step's slot write is two
    copies, the graph reading layer l's as views; `mask` (R, C) marks the S filled slots of the capacity C.
    Steps write one slot; capacity grows by GROW slots when full (a copy every GROW tokens); beams are reordered
    like Hugging Face's caches."""

    GROW = 16

    def __init__(self, present: torch.Tensor, dtype: torch.dtype, gather=None, repeats: int = 1):
        """present: the prefill's (L, 2, B, H, S, hd), each of its B rows copied to `repeats` cache rows (an
        item's beams); gather: a ldlm.kernels.native.RowGather to reorder the beams in one C call (CPU), None
        for torch."""
        L, _, B, H, S, hd = present.shape
        R, C = B * repeats, S + self.GROW
        self.gather = gather
        self.length = S
        # zeros beyond S: masked, and finite, so 0 * value stays 0 in the graph
        self.keys = torch.zeros(L, R, H, hd, C, dtype=dtype, device=present.device)
        self.values = torch.zeros(L, R, H, C, hd, dtype=dtype, device=present.device)
        self.keys.view(L, B, repeats, H, hd, C)[..., :S] = present[:, 0].transpose(-1, -2).unsqueeze(2)
        self.values.view(L, B, repeats, H, C, hd)[..., :S, :] = present[:, 1].unsqueeze(2)
        self.mask = torch.zeros(R, C, dtype=torch.long, device=present.device)
        self.mask[:, :S] = 1
        self._replaced()

    def _replaced(self) -> None:
        """The tensors are new: what was bound to the old ones is dropped."""
        self.bound_step: StepRun | None = None  # the step graph bound to these tensors (OnnxDecoder.step)
        self._bound_gather = None

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def inputs(self) -> dict[str, torch.Tensor]:
        named = {"past_mask": self.mask}
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            named[f"past_key_{layer}"], named[f"past_value_{layer}"] = k, v
        return named

    def make_room(self) -> None:
        """Ensure a free slot for the next token."""
        if self.length < self.capacity:
            return
        grow = self.GROW
        self.keys = torch.nn.functional.pad(self.keys, (0, grow))  # (L, R, H, hd, C + grow)
        self.values = torch.nn.functional.pad(self.values, (0, 0, 0, grow))  # (L, R, H, C + grow, hd)
        self.mask = torch.nn.functional.pad(self.mask, (0, grow))
        self._replaced()

    def append(self, new_kv: torch.Tensor) -> None:
        """Write the step's new_kv (L, 2, R, H, hd) into slot S."""
        S = self.length
        self.keys[..., S] = new_kv[:, 0]
        self.values[..., S, :] = new_kv[:, 1]
        self.mask[:, S] = 1
        self.length = S + 1

    def reorder_cache(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.mask.device)
        if self.gather is not None:  # in place; rows that keep their place are not copied
            if self._bound_gather is None:
                self._bound_gather = self.gather.bind([*self.keys, *self.values, self.mask])
            self._bound_gather(rows)
            return
        if torch.equal(rows, torch.arange(len(rows), device=rows.device)):  # beams kept their places: no copy
            return
        self.keys, self.values = self.keys.index_select(1, rows), self.values.index_select(1, rows)
        self.mask = self.mask.index_select(0, rows)
        self._replaced()


class OnnxDecoder:
    """The decoder graphs behind the interface the reference beam search uses (prefill, step, token ids)."""

    def __init__(self, prefill: Graph, step: Graph, tokenizer, spec: dict, config: ModelConfig, device: torch.device,
                 native: bool = False):
        """native: the beam search's bookkeeping and cache reorder in ldlm's C kernel (CPU only)."""
        self.prefill_graph, self.step_graph, self.tokenizer, self.spec = prefill, step, tokenizer, spec
        self.config, self.device, self.native = config, device, native
        self.eos_token_id, self.pad_token_id = spec["eos_token_id"], spec["pad_token_id"]
        self.cache_dtype = step.input_dtypes["past_key_0"]  # the step graph's compute dtype

    def beam_search(self, latents: torch.Tensor, config: BeamSearchConfig) -> list[list[int]]:
        """The reference beam search on these graphs (ldlm.sampling.beam_search); its bookkeeping native where chosen."""
        if self.native and config.num_beams <= MAX_BEAMS:
            return native_beam_search(self, latents, config)
        return beam_search(self, latents, config)

    def prefill(self, latents: torch.Tensor, repeats: int = 1) -> tuple[torch.Tensor, OnnxCache]:
        """latents (B, *latent_shape) -> next-token logits (B * repeats, V) and the prefix's cache, item b's in
        rows b * repeats ... b * repeats + repeats - 1 (its beams: the graph runs once per item)."""
        B, s = latents.shape[0], self.spec
        logits = torch.empty(B, s["vocab_size"], device=self.device)
        present = torch.empty(s["n_layer"], 2, B, s["n_head"], self.config.n_prefix, s["head_dim"], device=self.device)
        self.prefill_graph.run({"latent": latents.float()}, {"logits": logits, "present": present})
        cache = OnnxCache(present, self.cache_dtype, gather=RowGather() if self.native else None, repeats=repeats)
        return (logits.repeat_interleave(repeats, dim=0) if repeats > 1 else logits), cache

    def step(self, input_ids: torch.Tensor, cache: OnnxCache) -> tuple[torch.Tensor, OnnxCache]:
        """input_ids (R, 1), the token after the cache's S positions -> logits (R, V), a tensor the next step on
        this cache rewrites; the cache grows in place."""
        S, s = cache.length, self.spec
        if S >= s["n_positions"]:
            raise ValueError(f"the decoder's context of {s['n_positions']} positions is full; lower max_new_tokens")
        cache.make_room()
        input_ids, step = input_ids.long(), cache.bound_step
        if step is None or step.input_ids is not input_ids:  # the native search writes its tokens in place
            step = cache.bound_step = StepRun.bind(self.step_graph, input_ids, cache, self.spec)
        step.position_ids.fill_(S)
        step.run()
        cache.append(step.new_kv)
        return step.logits, cache


class OnnxSlotDecoder:
    """An OnnxDecoder's graphs over a SlotKV, for ldlm.fast.slot_decode's continuous decode: the prefill graph
    once per item, the step graph over every row with each row's own position and mask (inputs the graph
    already takes). The beam bookkeeping is C's, one call per item (`native`), where the C helper loads."""

    def __init__(self, decoder: OnnxDecoder):
        s = decoder.spec
        self.decoder, self.spec = decoder, s
        self.native = decoder.native  # the bookkeeping in C too (ldlm.fast.slot_decode.NativeBeams)
        self.kv = SlotKV(s["n_layer"], s["n_head"], s["head_dim"], decoder.cache_dtype, decoder.device,
                         gather=RowGather() if decoder.native else None)

    def add(self, latents: torch.Tensor, repeats: int) -> torch.Tensor:
        B, s = latents.shape[0], self.spec
        logits = torch.empty(B, s["vocab_size"], device=self.decoder.device)
        present = torch.empty(s["n_layer"], 2, B, s["n_head"], self.decoder.config.n_prefix, s["head_dim"],
                              device=self.decoder.device)
        self.decoder.prefill_graph.run({"latent": latents.float()}, {"logits": logits, "present": present})
        self.kv.add_rows(present.to(self.kv.keys.dtype), repeats)
        return logits.repeat_interleave(repeats, dim=0)

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kv, s = self.kv, self.spec
        kv.make_room()
        R = kv.rows
        logits = torch.empty(R, s["vocab_size"], device=self.decoder.device)
        new_kv = torch.empty(s["n_layer"], 2, R, s["n_head"], s["head_dim"], dtype=kv.keys.dtype,
                             device=self.decoder.device)
        inputs = {"input_ids": input_ids.long()[:, None], "position_ids": positions.long()[:, None],
                  "past_mask": kv.mask}
        for layer, (k, v) in enumerate(zip(kv.keys, kv.values)):
            inputs[f"past_key_{layer}"], inputs[f"past_value_{layer}"] = k, v
        self.decoder.step_graph.run(inputs, {"logits": logits, "new_kv": new_kv})
        kv.write(new_kv)
        return logits

    def select_rows(self, index: torch.Tensor) -> None:
        self.kv.select_rows(index)


@dataclass
class StepRun:
    """The step graph bound to one cache's tensors and one input_ids tensor, with its outputs; the logits
    tensor is rewritten by each step."""

    input_ids: torch.Tensor | None  # (R, 1) int64, the tensor bound by pointer; None: a copy was bound
    position_ids: torch.Tensor  # (R, 1) int64, the step's position, written before each run
    logits: torch.Tensor  # (R, V) float32
    new_kv: torch.Tensor  # (L, 2, R, H, hd) in the cache dtype
    run: Callable[[], None]

    @classmethod
    def bind(cls, graph, input_ids: torch.Tensor, cache: OnnxCache, spec: dict) -> StepRun:
        R, device = input_ids.shape[0], input_ids.device
        position_ids = torch.empty(R, 1, dtype=torch.long, device=device)
        logits = torch.empty(R, spec["vocab_size"], device=device)
        new_kv = torch.empty(spec["n_layer"], 2, R, spec["n_head"], spec["head_dim"], dtype=cache.keys.dtype,
                             device=device)
        run = graph.bind({"input_ids": input_ids, "position_ids": position_ids, **cache.inputs()},
                         {"logits": logits, "new_kv": new_kv})
        # a strided input is bound as a contiguous copy, which later writes into it would not reach: never reused
        return cls(input_ids if input_ids.is_contiguous() else None, position_ids, logits, new_kv, run)


def native_decode(options: OnnxOptions, device: torch.device) -> tuple[bool, str]:
    """Whether the beam search's bookkeeping runs in ldlm's C kernel, and the reason said at load."""
    if device.type != "cpu":
        return False, "beam bookkeeping in torch (on the device)"
    if not options.native_beam_update:
        return False, "beam bookkeeping in torch (native_beam_update off)"
    reason = unavailable_reason()  # builds the kernel on first use: a second or less, then cached
    if reason is not None:
        return False, f"beam bookkeeping in torch ({reason})"
    note = load_note()
    return True, "beam bookkeeping in ldlm's C kernel" + (f" ({note})" if note else "")
