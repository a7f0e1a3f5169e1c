"""The `onnx` backend: the pipeline's three networks run by ONNX Runtime from an export directory alone.

No PyTorch module or weight is loaded. torch stays in the loop for what must be bit-identical to the reference
path: the noise generator, the schedule's tables and the samplers' arithmetic (ldlm.sampling.samplers runs unchanged on
these parts). The beam search is the reference's algorithm: on the CPU its per-token bookkeeping and the KV
cache's beam reorder run as ldlm's C kernel (ldlm.fast.native_beam_search, the same tokens), else as
ldlm.sampling.beam_search's torch operations. Inputs and outputs are bound to torch
tensors' memory with IOBinding, so nothing is copied between the two, on the CPU or, with `onnxruntime-gpu`,
on the GPU. The loader (load_export_components) also serves the `aoti` backend: its graphs are AOTInductor
packages (ldlm.runtimes.aoti_runtime) behind the same interface, driven by the same code.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ldlm.kernels.native import MAX_BEAMS, RowGather, load_note, unavailable_reason

from ldlm.runtimes.backends import BackendUnavailable, resolve_backend
from ldlm.sampling.beam_search import BeamSearchConfig, beam_search
from ldlm.model.checkpoint import Components, check_latent_stats
from ldlm.model.config import ModelConfig
from ldlm.model.decoder import load_tokenizer
from ldlm.model.encoder import collect_token_states, encode_texts
from ldlm.fast.native_beam_search import native_beam_search
from ldlm.model.reverse import Condition

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
ELEMENT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}  # torch -> graph


@dataclass(frozen=True)
class OnnxOptions:
    provider: str = "auto"  # auto (CUDA when installed and the device is cuda, else CPU) | cpu | cuda
    intra_op_threads: int = 0  # threads inside one operator; 0: ONNX Runtime's default (the physical cores)
    inter_op_threads: int = 0  # threads across independent operators; 0: default
    optimization_level: str = "all"  # graph optimizations: disable | basic | extended | all
    int8_reverse: bool = False  # run the dynamically quantized (int8) reverse transformer
    int8_decoder: bool = False  # run the int8 decoder step (its LM head stays fp32)
    native_beam_update: bool = True  # on the CPU, the beam search's bookkeeping in ldlm's C kernel (built with the
    # system C compiler on first use, ldlm.kernels.native); False, or no compiler: torch operations, the same tokens
    cuda_graph: bool = False  # CUDA provider: the reverse graph's runs replayed as CUDA graphs (ORT's
    # enable_cuda_graph), one a batch and condition length, its inputs copied into fixed buffers each step
    cuda_provider_options: dict | None = None  # more CUDA provider options, by ONNX Runtime's names (e.g.
    # {"arena_extend_strategy": "kSameAsRequested"}); ldlm sets device_id and use_tf32 = 0 (fp32 parity)

    def __post_init__(self) -> None:
        if self.provider not in ("auto", *PROVIDERS):
            raise ValueError(f"unknown provider {self.provider!r}; choose auto, cpu or cuda")
        if self.cuda_graph and self.provider == "cpu":
            raise ValueError("cuda_graph replays the reverse graph on the GPU: use provider 'cuda' (or 'auto' with "
                             "device='cuda'), or leave cuda_graph off")
        reserved = {"device_id", "use_tf32", "enable_cuda_graph"} & set(self.cuda_provider_options or {})
        if reserved:
            raise ValueError(f"cuda_provider_options may not set {sorted(reserved)}: ldlm sets them (the device "
                             "from the tensors, TF32 off for fp32 parity, CUDA graphs by cuda_graph)")
        if self.optimization_level not in OPTIMIZATION_LEVELS:
            raise ValueError(f"unknown optimization_level {self.optimization_level!r}; choose one of {OPTIMIZATION_LEVELS}")


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailable("backend 'onnx' needs ONNX Runtime: pip install 'ldlm[onnx]' (or onnxruntime-gpu "
                                 "for CUDA), or use backend='reference' on the checkpoint") from e
    return onnxruntime


def gpu_install_hint() -> str:
    """How to get the CUDA provider. The CPU and GPU builds are one `onnxruntime` package each: installed side by
    side, whichever pip wrote last wins, so with both present the fix is to keep only the GPU one."""
    from importlib import metadata

    installed = set()
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
            installed.add(name)
        except metadata.PackageNotFoundError:
            pass
    if installed == {"onnxruntime", "onnxruntime-gpu"}:
        return ("both onnxruntime and onnxruntime-gpu are installed and the CPU build shadows the GPU one: "
                "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (or 'ldlm[onnx-gpu]')")
    return "pip install 'ldlm[onnx-gpu]' (onnxruntime-gpu, instead of the CPU build's 'ldlm[onnx]')"


def resolve_provider(options: OnnxOptions, device: torch.device) -> tuple[str, str]:
    """(provider, why). A provider that is asked for but not installed fails here, before any work."""
    ort = _import_onnxruntime()
    available = ort.get_available_providers()
    if options.provider == "cuda" or (options.provider == "auto" and device.type == "cuda"):
        if PROVIDERS["cuda"] not in available:
            raise BackendUnavailable(f"ONNX Runtime has no CUDA provider here (available: {available}): "
                                     f"{gpu_install_hint()}, or use provider='cpu'")
        if device.type != "cuda":
            raise BackendUnavailable("provider 'cuda' keeps tensors on the GPU: pass device='cuda'")
        graphs = ", the reverse graph as CUDA graphs" if options.cuda_graph else ""
        return "cuda", f"CUDAExecutionProvider with IOBinding (tensors stay on the GPU){graphs}"
    if device.type != "cpu":
        raise BackendUnavailable(f"provider 'cpu' runs on the CPU: pass device='cpu', not {device}")
    if options.cuda_graph:
        raise BackendUnavailable("cuda_graph replays the reverse graph on the GPU: pass device='cuda' (with "
                                 "onnxruntime-gpu), or leave cuda_graph off on the CPU")
    why = "requested" if options.provider == "cpu" else (
        "auto: device is cpu" if PROVIDERS["cuda"] in available else "auto: onnxruntime has no CUDA provider")
    return "cpu", f"CPUExecutionProvider ({why})"


class GraphShapes:
    """What the loader checks of any exported graph: `path`, and `shapes`, each input's and output's shape as the
    graph itself states it (fixed sizes as ints, dynamic axes as names)."""

    path: Path
    shapes: dict[str, list]

    def expect_shape(self, name: str, shape: list, source: str) -> None:
        """Refuse a manifest whose sizes (`source`) disagree with the graph's own: the loader allocates the
        outputs from the manifest's numbers, so a hostile one could ask for any amount of memory."""
        actual = self.shapes[name]
        if len(actual) != len(shape) or any(isinstance(a, int) and a != e for a, e in zip(actual, shape)):
            raise ValueError(f"{self.path} gives {name} the shape {actual}, but manifest.json's {source} implies "
                             f"{shape}: the manifest does not belong to this graph; re-run `ldlm export`")


def cuda_provider_options(options: OnnxOptions, device_id: int, cuda_graph: bool) -> dict[str, str]:
    """The CUDA provider's options for one session: the user's (OnnxOptions.cuda_provider_options), then the
    GPU torch's tensors are on, no TF32 (ORT's CUDA default, which would break fp32 parity with torch), and
    CUDA graphs where asked."""
    return {**{k: str(v) for k, v in (options.cuda_provider_options or {}).items()}, "device_id": str(device_id),
            "use_tf32": "0", **({"enable_cuda_graph": "1"} if cuda_graph else {})}


_PRELOADED = []  # whether ONNX Runtime's preload_dlls ran in this process


def _preload_cuda_libraries(ort) -> None:
    """Load CUDA and cuDNN from the NVIDIA pip packages (as the GPU image ships them, beside its torch) before
    the CUDA provider needs them: onnxruntime.preload_dlls, once (ONNX Runtime 1.21 and later)."""
    if _PRELOADED or not hasattr(ort, "preload_dlls"):
        return
    _PRELOADED.append(True)
    try:
        ort.preload_dlls()
    except Exception as e:  # the libraries torch loaded may serve; if not, the provider check below says so
        warnings.warn(f"onnxruntime.preload_dlls() failed ({e}); relying on the CUDA libraries already loaded")


class Graph(GraphShapes):
    """One ONNX Runtime session whose inputs and outputs are torch tensors bound by pointer (IOBinding)."""

    def __init__(self, path: Path, spec: dict, provider: str, options: OnnxOptions, *, spin: bool = False,
                 device_id: int = 0, cuda_graph: bool = False):
        """cuda_graph: with the CUDA provider, ORT captures each run's kernels as a CUDA graph (per graph id,
        bind(graph_id=...)) and replays it: the bound tensors must then keep their addresses and shapes."""
        ort = _import_onnxruntime()
        if provider == "cuda":
            _preload_cuda_libraries(ort)
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        # ORT's pool spins after each run (its default), which keeps the cores from torch's work between runs.
        # Measured on 2 cores (bench/RESULTS.md): spinning makes the sampling loop (reverse graph back to back,
        # tiny updates between) 1.6x faster, and the beam decode (log-softmax and top-k over the vocabulary
        # between steps) 2x slower; so only the reverse graph spins.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[options.optimization_level]
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the export is incomplete; re-run `ldlm export`")
        provider_options = cuda_provider_options(options, device_id, cuda_graph) if provider == "cuda" else {}
        try:
            self.session = ort.InferenceSession(str(path), so, providers=[(PROVIDERS[provider], provider_options)])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... classes
            if cuda_graph:  # e.g. a node ORT places on the CPU (shape arithmetic), which a CUDA graph cannot hold
                raise BackendUnavailable(
                    f"ONNX Runtime could not prepare {path.name} for CUDA graphs ({type(e).__name__}: {e}): a CUDA "
                    "graph needs every node on the CUDA provider; leave cuda_graph off") from e
            raise ValueError(f"{path} could not be loaded by ONNX Runtime ({type(e).__name__}: {e}): the graph is "
                             "corrupt or from an incompatible exporter; re-run `ldlm export`") from e
        self._run_options = ort.RunOptions
        running = self.session.get_providers()
        if running[:1] != [PROVIDERS[provider]]:
            # ONNX Runtime falls back to the CPU when a provider fails to start (onnxruntime-gpu without a GPU, or
            # without the CUDA and cuDNN libraries it was built for), logging the cause; tensors bound on the GPU
            # would then be read by the CPU. Stop here instead.
            raise BackendUnavailable(
                f"ONNX Runtime could not start {PROVIDERS[provider]} for {path.name} (it runs {running}); its log "
                "above says why (no GPU, or CUDA/cuDNN libraries that do not match onnxruntime-gpu's build): "
                "install the libraries it names, or use provider='cpu' with device='cpu'")
        self.path, self.device_type = path, provider
        named = {name: dtype for dtype, name in ELEMENT_TYPES.items()}
        unknown = [i["dtype"] for i in spec["inputs"] if i["dtype"] not in named]
        if unknown:
            raise ValueError(f"manifest.json gives {path.name} inputs of types {unknown}, which ldlm never exports: "
                             "re-run `ldlm export`")
        self.input_dtypes = {i["name"]: named[i["dtype"]] for i in spec["inputs"]}
        expected = ([i["name"] for i in spec["inputs"]], [o["name"] for o in spec["outputs"]])
        actual = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if expected != actual:
            raise ValueError(f"{path} does not match manifest.json: the graph has inputs/outputs {actual}, the "
                             f"manifest lists {expected}; re-run `ldlm export` (a graph was replaced)")
        # each input's and output's shape, fixed sizes as ints and dynamic axes as names
        self.shapes = {v.name: list(v.shape) for v in (*self.session.get_inputs(), *self.session.get_outputs())}

    def run(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        """Run with `inputs`, writing into the preallocated `outputs` (shapes known to the caller)."""
        self.bind(inputs, outputs)()

    def bind(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
             graph_id: int | None = None) -> Callable[[], None]:
        """A run bound once to these tensors (IOBinding) and kept alive with them: each call reads what the
        inputs hold then and rewrites the outputs, so a loop that updates its inputs in place binds once (at a
        few rows, binding a dozen tensors costs a sixth of the decoder step itself). graph_id: in a session
        made with cuda_graph, the CUDA graph this run captures, then replays (ORT's gpu_graph_id: one per set
        of shapes)."""
        bad = [name for name, tensor in outputs.items() if not tensor.is_contiguous()]
        if bad:  # ONNX Runtime writes through the pointer: a copy would leave the caller's tensor unwritten
            raise ValueError(f"outputs {bad} must be contiguous tensors")
        binding = self.session.io_binding()
        inputs = {name: tensor.contiguous() for name, tensor in inputs.items()}
        for bind, tensors in ((binding.bind_input, inputs), (binding.bind_output, outputs)):
            for name, tensor in tensors.items():
                bind(name, self.device_type, tensor.device.index or 0, ELEMENT_TYPES[tensor.dtype],
                     tuple(tensor.shape), tensor.data_ptr())
        device = next(iter(inputs.values())).device
        run_options = None
        if graph_id is not None:
            run_options = self._run_options()
            run_options.add_run_config_entry("gpu_graph_id", str(graph_id))

        def run() -> None:
            if self.device_type == "cuda":
                # ONNX Runtime's CUDA provider runs on a stream of its own and does not wait for torch's
                # (onnxruntime issue 26609): what torch wrote into the inputs must be complete first. Its run
                # (a CUDA graph's replay too) syncs its own stream before returning, so the outputs are ready
                # for torch after it.
                torch.cuda.synchronize(device)
            self.session.run_with_iobinding(binding, run_options)

        run.tensors = (inputs, outputs)  # the binding holds raw pointers: their memory lives as long as the run
        return run


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


class OnnxReverse:
    """The reverse transformer graph as a denoiser: (x_t (B, D), t (B,)[, x0_prev][, condition]) -> x0_hat
    (B, D); for a conditional model also what ldlm.sampling.guidance reads of a ReverseTransformer: embed_condition
    (the condition graph) and null (the manifest's learned null condition)."""

    def __init__(self, graph: Graph, config: ModelConfig, condition_graph: Graph | None = None,
                 null_condition: torch.Tensor | None = None, *, static_inputs: bool = False):
        """static_inputs: bind each input shape's run once to buffers of its own and copy every call's inputs
        into them (what ORT's CUDA graphs need: a graph replays the addresses it captured; one graph id a
        shape). Calls then take turns on the buffers; without it each call binds its own tensors and calls
        from several threads run at once."""
        self.graph, self.config = graph, config
        self.condition_graph, self.null_condition = condition_graph, null_condition  # (1, d_model) float32
        self.static_inputs = static_inputs
        self._static: dict[tuple, tuple[dict[str, torch.Tensor], torch.Tensor, Callable[[], None]]] = {}
        self._static_lock = threading.Lock()

    def _run_static(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """inputs copied into this shape's bound buffers, one run (captured the first time in a CUDA-graph
        session, replayed after), the output copied out (a multistep sampler keeps the previous x0_hat)."""
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())
        with self._static_lock:
            if key not in self._static:
                buffers = {name: torch.empty_like(t, memory_format=torch.contiguous_format) for name, t in inputs.items()}
                out = torch.empty_like(buffers["x_t"])
                self._static[key] = (buffers, out, self.graph.bind(buffers, {"x0_hat": out}, graph_id=len(self._static)))
            buffers, out, run = self._static[key]
            for name, tensor in inputs.items():
                buffers[name].copy_(tensor)
            run()
            return out.clone()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, x0_prev: torch.Tensor | None = None,
                 condition: Condition | None = None) -> torch.Tensor:
        inputs = {"x_t": x_t.float(), "t": t.float()}
        if self.config.self_condition:
            inputs["x0_prev"] = torch.zeros_like(inputs["x_t"]) if x0_prev is None else x0_prev.float()
        if self.config.condition is not None:
            condition = condition if condition is not None else self.null(x_t.shape[0])
            inputs["condition_tokens"] = condition.tokens.float()
            inputs["condition_mask"] = condition.mask.long()
        elif condition is not None:
            raise ValueError("this reverse transformer is unconditional: it takes no condition")
        if self.static_inputs:
            return self._run_static(inputs)
        out = torch.empty_like(inputs["x_t"])
        self.graph.run(inputs, {"x0_hat": out})
        return out

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


def _check_sizes(encoder: OnnxEncoder, reverse: OnnxReverse, decoder: OnnxDecoder, config: ModelConfig) -> None:
    """The manifest's model config and decoder sizes against the graphs', before any tensor is allocated."""
    latent, s = list(config.latent_shape), decoder.spec
    for key in ("n_layer", "n_head", "head_dim", "vocab_size", "n_positions", "eos_token_id", "pad_token_id"):
        if isinstance(s.get(key), bool) or not isinstance(s.get(key), int) or s[key] < 0:
            raise ValueError(f"manifest.json's decoder {key} must be a whole number, got {s.get(key)!r}: re-run "
                             "`ldlm export`")
    encoder.graph.expect_shape("latent", ["batch", *latent], "model config")
    reverse.graph.expect_shape("x_t", ["batch", *latent], "model config")
    reverse.graph.expect_shape("x0_hat", ["batch", *latent], "model config")
    decoder.prefill_graph.expect_shape("latent", ["batch", *latent], "model config")
    decoder.prefill_graph.expect_shape("logits", ["batch", s["vocab_size"]], "decoder vocab_size")
    decoder.prefill_graph.expect_shape("present", [s["n_layer"], 2, "batch", s["n_head"], config.n_prefix,
                                                   s["head_dim"]], "decoder sizes")
    decoder.step_graph.expect_shape("logits", ["batch", s["vocab_size"]], "decoder vocab_size")
    decoder.step_graph.expect_shape("new_kv", [s["n_layer"], 2, "batch", s["n_head"], s["head_dim"]], "decoder sizes")
    if config.condition is not None:
        reverse.graph.expect_shape("condition_tokens", ["batch", "length", config.d_model], "model config")
        length = 1 if config.condition == "label" else "length"
        reverse.condition_graph.expect_shape("condition_tokens", ["batch", length, config.d_model], "model config")
    if config.condition == "text":
        encoder.graph.expect_shape("token_states", ["batch", "length", encoder.hidden_size], "model config")


def _condition_parts(directory: Path, manifest: dict, specs: dict, config: ModelConfig, graph,
                     device: torch.device) -> tuple[Graph | None, torch.Tensor | None]:
    """A conditional model's condition graph and null condition (1, d_model); (None, None) for another."""
    from ldlm.export.manifest import ExportError

    if config.condition is None:
        return None, None
    if "condition" not in specs or "null_condition" not in manifest:
        raise ExportError(f"{directory} holds a {config.condition}-conditioned model but no condition graph or null "
                          "condition: export the checkpoint again with `ldlm export`")
    try:
        null = torch.tensor(manifest["null_condition"], dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{directory / 'manifest.json'} has a malformed null_condition ({e}): re-run "
                          "`ldlm export`") from e
    if tuple(null.shape) != (1, config.d_model):
        raise ExportError(f"{directory / 'manifest.json'}: null_condition must be (1, {config.d_model}), not "
                          f"{tuple(null.shape)}: re-run `ldlm export`")
    return graph("condition"), null.to(device)


def load_export_components(directory: str | Path, device: torch.device, dtype: torch.dtype = torch.float32,
                           options: OnnxOptions | None = None, backend: str = "auto", *,
                           trust_native_code: bool = False) -> tuple[Components, str, str]:
    """The pipeline's parts from an export directory, the backend that runs them ("onnx" for ONNX graphs,
    "aoti" for AOTInductor packages; `backend` is the one asked for, refused if it is neither "auto" nor the
    export's), and which provider runs them and why. AOTInductor packages are native code: they load only with
    trust_native_code or when this user's key signed the manifest (ldlm.runtimes.aoti_runtime.native_code_consent).

    Checks everything before any work: the manifest and every file's hash, the backend and the provider (or the
    AOTInductor target), and that each graph loads and has the inputs and outputs the manifest lists."""
    from ldlm.export.manifest import ExportError, file_hash, graph_format, read_manifest

    options = options or OnnxOptions()
    directory = Path(directory)
    manifest = read_manifest(directory)
    backend, _ = resolve_backend(backend, device, export=graph_format(manifest))
    if backend == "aoti":
        from ldlm.runtimes.aoti_runtime import AotiGraph, check_target, native_code_consent

        if options.int8_reverse or options.int8_decoder or options.cuda_graph:
            raise ExportError(f"{directory} holds AOTInductor packages, which have no int8 graphs and no ONNX "
                              "Runtime CUDA graphs: drop int8 and cuda_graph, or load an ONNX export (`ldlm export`)")
        why = check_target(manifest, directory, device)
        why += "; " + native_code_consent(manifest, directory, trust_native_code)
    else:
        provider, why = resolve_provider(options, device)
    variant = {torch.float32: "float32", torch.float16: "float16"}.get(dtype)
    if variant is None or variant not in manifest["graphs"]:
        raise ExportError(f"{directory} has no {dtype} graphs (it has {sorted(manifest['graphs'])}): export them "
                          "with `ldlm export`, or pick another dtype")
    specs = dict(manifest["graphs"][variant])
    int8 = [name for name, wanted in (("reverse", options.int8_reverse), ("decoder_step", options.int8_decoder))
            if wanted]
    for name in int8:
        if name not in manifest["graphs"].get("int8", {}):
            raise ExportError(f"{directory} has no int8 {name} graph: export again with this ldlm, without --no-int8")
        specs[name] = manifest["graphs"]["int8"][name]

    cuda_graph = backend == "onnx" and options.cuda_graph

    def graph(name: str) -> Graph:
        if backend == "aoti":
            return AotiGraph(directory / specs[name]["file"], specs[name], file_hash(directory, manifest,
                                                                                      specs[name]["file"]))
        return Graph(directory / specs[name]["file"], specs[name], provider, options, spin=name == "reverse",
                     device_id=device.index or 0, cuda_graph=cuda_graph and name == "reverse")

    try:
        config = ModelConfig.from_dict(manifest["model"])
    except (TypeError, ValueError) as e:
        raise ExportError(f"{directory / 'manifest.json'} has an invalid model config: {e}") from e
    if "past_key_0" not in {i["name"] for i in specs["decoder_step"]["inputs"]}:
        raise ExportError(f"{directory} was exported by an older ldlm, whose decoder step graph copies the whole "
                          "cache every token: export the checkpoint again with `ldlm export`")
    encoder = OnnxEncoder(graph("encoder"), load_tokenizer(directory / manifest["tokenizers"]["encoder"]),
                          manifest["encoder"]["max_tokens"], config.latent_shape, device)
    native, native_why = native_decode(options, device)
    vocab = manifest["decoder"].get("vocab_size")  # checked as a whole number by _check_sizes below
    decoder = OnnxDecoder(graph("decoder_prefill"), graph("decoder_step"),
                          load_tokenizer(directory / manifest["tokenizers"]["decoder"],
                                         vocab_size=vocab if type(vocab) is int else None,
                                         saved_size=manifest["decoder"].get("tokenizer_size")),
                          manifest["decoder"], config, device, native=native)
    reverse = OnnxReverse(graph("reverse"), config, *_condition_parts(directory, manifest, specs, config, graph,
                                                                    device), static_inputs=cuda_graph)
    _check_sizes(encoder, reverse, decoder, config)
    stats = manifest["latent_stats"]
    try:
        mean, std = torch.tensor(stats["mean"], dtype=torch.float32), torch.tensor(stats["std"], dtype=torch.float32)
    except (TypeError, ValueError, KeyError) as e:
        raise ExportError(f"{directory / 'manifest.json'} has malformed latent_stats ({e}): re-run "
                          "`ldlm export`") from e
    if tuple(mean.shape) != config.latent_shape or tuple(std.shape) != config.latent_shape:
        raise ExportError(f"{directory / 'manifest.json'}: latent_stats must have the latent's shape "
                          f"{config.latent_shape}, not {tuple(mean.shape)}: re-run `ldlm export`")
    check_latent_stats(mean, std, f"{directory / 'manifest.json'} latent_stats")
    detail = f"{why}; {variant}{''.join(f' + int8 {name}' for name in int8)} graphs"
    if not int8 and manifest["graphs"].get("int8"):
        # fp32 stays the default: it is the reference's parity mode; int8 is chosen, not imposed
        detail += " (int8 graphs are here too, about 2x faster sampling on the CPU: --int8)"
    if backend == "onnx" and provider == "cpu":
        threads = options.intra_op_threads or os.cpu_count()
        detail += f", {threads} intra-op threads, optimization {options.optimization_level}"
    detail += f"; {native_why}"
    return Components(config, encoder, decoder, reverse, mean, std, encoder_bundled=False), backend, detail
