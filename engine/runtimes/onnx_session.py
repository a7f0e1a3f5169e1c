"""ONNX Runtime itself: the options a user sets (OnnxOptions), which provider runs (CPU or CUDA, and why), and
one graph's session (Graph) with its inputs and outputs bound to torch tensors' memory (IOBinding), on the CPU
or, with `onnxruntime-gpu`, on the GPU."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ldlm.runtimes.backends import BackendUnavailable
from ldlm.runtimes.graph_io import ELEMENT_TYPES, GraphShapes

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


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
