"""`ldlm export`: a checkpoint -> its ONNX graphs (fp32, fp16; int8 reverse transformer and decoder step) + a
manifest.

The graphs: encoder, reverse transformer, decoder prefill and step; a conditional model adds its condition
embedding ("condition"), its reverse graph takes the condition's tokens and mask (a cross-attention model's: its
keys and values, which "condition_kv" projects once per sampling run), a text-conditioned model's
encoder graph also returns the token states its sources are read from, and the manifest holds the learned
null condition (classifier-free guidance's unconditional branch).

Exporter: torch's dynamo-based `torch.onnx.export(..., dynamo=True)` (torch.export, then onnxscript), torch's
default since 2.9 and the path the TorchScript exporter's deprecation points to. It exports every graph here
as is, including the Hugging Face BERT with its attention mask; the caches go in and out as plain tensors
(export/graphs.py), so no cache class has to be traced. Example inputs use sizes of at least 2 on every
dynamic axis, since torch.export specializes axes it sees at size 0 or 1.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import platform
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ldlm import __version__
from ldlm.model.checkpoint import Components, load_checkpoint

from .graphs import (ConditionGraph, ConditionKeysValuesGraph, DecoderPrefillGraph, DecoderStepGraph, EncoderGraph,
                     ReverseGraph, reads_projection)
from .manifest import GRAPHS, is_export, write_manifest

OPSET = 18  # LayerNormalization needs 17; 18 is the newest opset ONNX Runtime's CPU and CUDA kernels fully cover
VARIANTS = {"float32": "", "float16": ".fp16"}  # variant -> file suffix


@dataclass(frozen=True)
class GraphSpec:
    """How one graph is built and traced: its module, example inputs, and which axes are dynamic."""

    build: Callable[[Components], nn.Module]
    inputs: Callable[[Components], dict[str, torch.Tensor]]  # example inputs by name, in forward's order
    outputs: Callable[[Components], tuple[str, ...]]
    dynamic: Callable[[Components], dict[str, dict[int, object]]]  # input name -> {axis: torch.export.Dim}


def _dims():
    Dim = torch.export.Dim
    return Dim("batch", min=1, max=65536), Dim("length", min=1, max=4096), Dim("capacity", min=1, max=4096)


def _encoder_inputs(c: Components) -> dict[str, torch.Tensor]:
    real = c.encoder.tokenizer(["an example text", "two"])["input_ids"]  # unequal lengths: padding is traced
    width = max(len(row) for row in real)
    ids = torch.full((2, width), c.encoder.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, row in enumerate(real):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask}


def _reverse_inputs(c: Components) -> dict[str, torch.Tensor]:
    inputs = {"x_t": torch.randn(2, *c.config.latent_shape), "t": torch.tensor([3.0, 700.0])}
    if c.config.self_condition:
        inputs["x0_prev"] = torch.randn(2, *c.config.latent_shape)
    if c.config.condition is not None:  # three condition tokens, the second row's last one padding
        inputs[_condition_input(c)] = torch.randn(2, 3, _condition_width(c))
        inputs["condition_mask"] = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return inputs


def _condition_input(c: Components) -> str:
    """The reverse graph's condition input: the tokens, or (cross-attention) their keys and values."""
    return "condition_kv" if reads_projection(c.reverse) else "condition_tokens"


def _condition_width(c: Components) -> int:
    return c.config.d_model * (2 * c.config.n_layers if reads_projection(c.reverse) else 1)


def _condition_inputs(c: Components) -> dict[str, torch.Tensor]:
    if c.config.condition == "label":
        return {"states": torch.tensor([0, len(c.config.labels) - 1])}
    return {"states": torch.randn(2, 3, c.config.latent_dim)}


def _step_inputs(c: Components) -> dict[str, torch.Tensor]:
    cfg = c.decoder.gpt2.config
    rows, filled, capacity = 2, c.config.n_prefix, c.config.n_prefix + 2  # capacity > filled: masked slots traced
    heads, head_dim, dtype = cfg.n_head, cfg.n_embd // cfg.n_head, next(c.decoder.parameters()).dtype
    past_mask = torch.zeros(rows, capacity, dtype=torch.long)
    past_mask[:, :filled] = 1
    inputs = {"input_ids": torch.tensor([[1], [2]]), "position_ids": torch.full((rows, 1), filled),
              "past_mask": past_mask}
    for layer in range(cfg.n_layer):
        inputs[f"past_key_{layer}"] = torch.randn(rows, heads, head_dim, capacity, dtype=dtype)
        inputs[f"past_value_{layer}"] = torch.randn(rows, heads, capacity, head_dim, dtype=dtype)
    return inputs


def _step_dynamic(c: Components) -> dict[str, dict[int, object]]:
    batch, _, capacity = _dims()
    dynamic = {"input_ids": {0: batch}, "position_ids": {0: batch}, "past_mask": {0: batch, 1: capacity}}
    for layer in range(c.decoder.gpt2.config.n_layer):
        dynamic[f"past_key_{layer}"] = {0: batch, 3: capacity}
        dynamic[f"past_value_{layer}"] = {0: batch, 2: capacity}
    return dynamic


def _reverse_dynamic(c: Components):
    batch, length, _ = _dims()
    return {"x_t": {0: batch}, "t": {0: batch}, "x0_prev": {0: batch}, _condition_input(c): {0: batch, 1: length},
            "condition_mask": {0: batch, 1: length}}


def _encoder_dynamic(c: Components):
    batch = _dims()[0]
    # at most the position table's size, at least [CLS] [SEP]: the bounds torch.export derives from BERT's code
    length = torch.export.Dim("length", min=2, max=c.encoder.model.config.max_position_embeddings)
    return {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}


def _condition_dynamic(c: Components):
    batch, length, _ = _dims()
    return {"states": {0: batch} if c.config.condition == "label" else {0: batch, 1: length}}


def _condition_kv_dynamic(c: Components):
    batch, length, _ = _dims()
    return {"condition_tokens": {0: batch, 1: length}}


def _reads_sources(c: Components) -> bool:
    return c.config.condition == "text"


SPECS: dict[str, GraphSpec] = {
    "encoder": GraphSpec(lambda c: EncoderGraph(c.encoder, token_states=_reads_sources(c)), _encoder_inputs,
                         lambda c: ("latent", "token_states") if _reads_sources(c) else ("latent",), _encoder_dynamic),
    "reverse": GraphSpec(lambda c: ReverseGraph(c.reverse), _reverse_inputs, lambda c: ("x0_hat",), _reverse_dynamic),
    "decoder_prefill": GraphSpec(lambda c: DecoderPrefillGraph(c.decoder),
                                 lambda c: {"latent": torch.randn(2, *c.config.latent_shape)},
                                 lambda c: ("logits", "present"), lambda c: {"latent": {0: _dims()[0]}}),
    "decoder_step": GraphSpec(lambda c: DecoderStepGraph(c.decoder), _step_inputs, lambda c: ("logits", "new_kv"),
                              _step_dynamic),
    "condition": GraphSpec(lambda c: ConditionGraph(c.reverse), _condition_inputs, lambda c: ("condition_tokens",),
                           _condition_dynamic),
    "condition_kv": GraphSpec(lambda c: ConditionKeysValuesGraph(c.reverse),
                              lambda c: {"condition_tokens": torch.randn(2, 3, c.config.d_model)},
                              lambda c: ("condition_kv",),
                              _condition_kv_dynamic),
}


def graph_names(c: Components) -> tuple[str, ...]:
    """The graphs an export of `c` holds."""
    conditional = ("condition",) if c.config.condition is not None else ()
    return GRAPHS + conditional + (("condition_kv",) if reads_projection(c.reverse) else ())


def _in_dtype(components: Components, dtype: torch.dtype) -> Components:
    if dtype == torch.float32:
        return components
    c = copy.copy(components)
    c.encoder, c.decoder, c.reverse = (copy.deepcopy(m).to(dtype) for m in (c.encoder, c.decoder, c.reverse))
    return c


def _io(model_path: Path) -> dict[str, list[dict]]:
    """Names, element types and shapes (ints or axis names) of a saved graph's inputs and outputs."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph

    def describe(values):
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]

    return {"inputs": describe(graph.input), "outputs": describe(graph.output)}


@contextlib.contextmanager
def quiet_exporter():
    """Silence the exporter's notes that are not about our graphs: warnings on renamed axes and deprecated
    pytree classes, and the op registry's line for each torchvision op it skips when torchvision is absent
    (32 lines per graph; ldlm uses none of them)."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")

    registry.addFilter(keep)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registry.removeFilter(keep)


@dataclass(frozen=True)
class Traceable:
    """What torch.export takes for one graph: the module, example inputs by name, and their dynamic axes in
    torch.export's nesting (a forward's *args as one tuple)."""

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    dynamic_shapes: tuple


def traceable(components: Components, name: str) -> Traceable:
    spec = SPECS[name]
    module = spec.build(components).eval()
    inputs = spec.inputs(components)
    dynamic = [spec.dynamic(components).get(k) for k in inputs]  # positional, as the inputs are passed
    params = inspect.signature(module.forward).parameters.values()
    fixed = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params) and len(dynamic) > fixed:
        dynamic = [*dynamic[:fixed], tuple(dynamic[fixed:])]  # torch.export nests *args in one tuple
    return Traceable(module, inputs, spec.outputs(components), tuple(dynamic))


def export_graph(components: Components, name: str, path: Path, opset: int = OPSET) -> dict:
    """Trace graph `name` of `components`, save it to `path`, validate it with the ONNX checker."""
    import onnx

    t = traceable(components, name)
    with quiet_exporter(), torch.no_grad():
        torch.onnx.export(t.module, tuple(t.inputs.values()), str(path), input_names=list(t.inputs),
                          output_names=list(t.outputs), dynamic_shapes=t.dynamic_shapes,
                          opset_version=opset, dynamo=True, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)
    data = path.with_name(path.name + ".data")  # the exporter moves large weights into an external data file
    return {"file": path.name, **({"external_data": data.name} if data.is_file() else {}), **_io(path)}


def _matmul_before(graph, output: str) -> str:
    """The MatMul or Gemm that produces graph output `output`, through any elementwise nodes after it."""
    producers = {name: node for node in graph.node for name in node.output}
    node = producers[output]
    while node.op_type not in ("MatMul", "Gemm"):
        node = next(producers[name] for name in node.input if name in producers)
    return node.name


# graph -> the MatMuls that stay fp32 when the rest are quantized to int8, from the graph and its weight MatMuls
# in graph order
INT8_FP32_MATMULS: dict[str, Callable[[object, list[str]], list[str]]] = {
    # the input projection (noisy latent and time embedding in: the forward's first MatMul) and the output one
    "reverse": lambda graph, matmuls: [matmuls[0], _matmul_before(graph, "x0_hat")],
    "decoder_step": lambda graph, matmuls: [_matmul_before(graph, "logits")],  # the LM head, which picks tokens
}


def quantize_int8(name: str, source: Path, target: Path) -> dict:
    """int8 graph `name` (INT8_FP32_MATMULS): ONNX Runtime's dynamic quantization, weights int8 per output
    channel, activations quantized per call, of every weight MatMul but those that stay fp32.

    Why (bench/RESULTS.md, "int8 that keeps fp32's text"). The reverse transformer on the E2E model, one-step x0
    error against fp32 at t = 50 / 700 / 950: 2.2 / 2.5 / 4.4% with every MatMul quantized per tensor, 1.9 / 2.2
    / 3.1% per channel, 1.3 / 1.1 / 1.1% per channel with its two projections in fp32 (2% of its weights), at
    the same speed. Weight-only int8 (MatMulNBits, fp32 compute) was as accurate but 7x slower than fp32 at
    batch 1; its blockwise int8-compute mode 2x slower than this at batch 1 and 3x at batch 8. The decoder step:
    1.3x (4 rows) to 1.9x (32 rows) faster than fp32 with logits within 0.9%; its LM head, which picks the
    tokens, stays fp32 for about 5% of that speed."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:  # shape inference first, as ONNX Runtime's quantizer asks
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
        graph = onnx.load(str(prepared), load_external_data=False).graph
        weights = {i.name for i in graph.initializer}
        matmuls = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and weights & set(n.input)]
        keep = INT8_FP32_MATMULS[name](graph, matmuls)
        # the quantizer first rewrites each Gemm as a MatMul named <name>_MatMul (plus an Add), then excludes
        keep += [f"{node}_MatMul" for node in keep]
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=keep)
    return {"file": target.name, **_io(target)}


def versions() -> dict[str, str]:
    """The versions an export was written with (the ONNX packages where installed)."""
    import importlib

    import transformers

    found = {"ldlm": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version()}
    for package in ("onnx", "onnxscript", "onnxruntime"):
        try:
            found[package] = importlib.import_module(package).__version__
        except ImportError:
            pass
    return found


def check_target(out: Path, overwrite: bool) -> None:
    """ldlm export writes a new folder, or replaces an earlier export when told to; anything else is refused
    before any work (a checkpoint given as its own target would be overwritten)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file: pass a new directory for the export")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_export(out):
        kind = "an ldlm checkpoint" if (out / "config.json").is_file() else "not an ldlm export"
        raise FileExistsError(f"{out} is not empty and is {kind}: ldlm export writes into a new or empty directory; "
                              "pass another one")
    if not overwrite:
        raise FileExistsError(f"{out} already holds an export: pass --overwrite (overwrite=True) to replace it, or a "
                              "new directory")


def export_checkpoint(checkpoint: str | Path | Components, out: str | Path, *, variants=("float32", "float16"),
                      int8: bool = True, opset: int = OPSET, overwrite: bool = False, log=print) -> Path:
    """Write the graphs of `checkpoint` (a directory or loaded Components) and their manifest into `out`: a new
    or empty directory, or (overwrite=True) an earlier export, replaced only once the new one is complete."""
    out = Path(out)
    check_target(out, overwrite)
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "float32" not in variants:
        raise ValueError(f"variants must include float32 and come from {list(VARIANTS)}, got {list(variants)}")
    components = checkpoint if isinstance(checkpoint, Components) else load_checkpoint(checkpoint)
    write_atomically(out, lambda staging: _write_export(components, staging, variants=variants, int8=int8,
                                                        opset=opset, log=log))
    log(f"wrote {out / 'manifest.json'}")
    return out


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """write(staging) into a folder beside `out`, which then replaces `out` (empty, or an earlier export checked
    by check_target) in one rename: an interrupted export leaves no half-written folder behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by an export of this process id that was killed
    staging.mkdir()
    try:
        write(staging)
        if out.is_dir():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_tokenizers(components: Components, out: Path) -> None:
    """The tokenizer folders model_fields' "tokenizers" names."""
    components.encoder.tokenizer.save_pretrained(out / "encoder_tokenizer")
    components.decoder.tokenizer.save_pretrained(out / "decoder_tokenizer")


def _write_export(components: Components, out: Path, *, variants, int8: bool, opset: int, log) -> None:
    save_tokenizers(components, out)

    graphs: dict[str, dict] = {}
    for variant in variants:
        converted = _in_dtype(components, getattr(torch, variant))
        graphs[variant] = {}
        for name in graph_names(components):
            path = out / f"{name}{VARIANTS[variant]}.onnx"
            graphs[variant][name] = export_graph(converted, name, path, opset)
            size = sum(p.stat().st_size for p in out.glob(f"{path.name}*"))
            log(f"exported {name} ({variant}) -> {path.name} ({size / 2**20:.1f} MiB)")
    if int8:
        graphs["int8"] = {}
        for name in INT8_FP32_MATMULS:
            graphs["int8"][name] = quantize_int8(name, out / f"{name}.onnx", out / f"{name}.int8.onnx")
            log(f"quantized {name} (int8) -> {name}.int8.onnx")

    write_manifest(out, {
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=True)",
        "versions": versions(),
        **model_fields(components),
        "graphs": graphs,
    })


def model_fields(components: Components) -> dict:
    """What a runtime needs besides the graphs, for any graph format: the model config, latent statistics,
    tokenizer folders, encoder and decoder sizes, a conditional model's null condition."""
    gpt2 = components.decoder.gpt2.config
    return {
        "model": components.config.to_dict(),
        "latent_stats": {"mean": components.latent_mean.tolist(), "std": components.latent_std.tolist()},
        "tokenizers": {"encoder": "encoder_tokenizer", "decoder": "decoder_tokenizer"},
        "encoder": {"latent_dim": components.encoder.latent_dim, "max_tokens": components.encoder.max_tokens},
        "decoder": {"eos_token_id": components.decoder.eos_token_id, "pad_token_id": components.decoder.pad_token_id,
                    "n_layer": gpt2.n_layer, "n_head": gpt2.n_head, "head_dim": gpt2.n_embd // gpt2.n_head,
                    "vocab_size": gpt2.vocab_size, "n_positions": gpt2.n_positions,
                    "tokenizer_size": len(components.decoder.tokenizer)},
        **({"null_condition": components.reverse.null_condition.detach().float().tolist()}
           if components.config.condition is not None else {}),
    }
