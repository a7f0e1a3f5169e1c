"""The `onnx` backend: the pipeline's three networks run by ONNX Runtime from an export directory alone; this
module is its loader (load_export_components), which checks everything before any work. ONNX Runtime's options,
providers and sessions are ldlm.runtimes.onnx_session; the networks on the graphs, ldlm.runtimes.onnx_parts.

No PyTorch module or weight is loaded. torch stays in the loop for what must be bit-identical to the reference
path: the noise generator, the schedule's tables and the samplers' arithmetic (ldlm.sampling.samplers runs unchanged on
these parts). The beam search is the reference's algorithm: on the CPU its per-token bookkeeping and the KV
cache's beam reorder run as ldlm's C kernel (ldlm.fast.native_beam_search, the same tokens), else as
ldlm.sampling.beam_search's torch operations. Inputs and outputs are bound to torch
tensors' memory with IOBinding, so nothing is copied between the two, on the CPU or, with `onnxruntime-gpu`,
on the GPU. The loader also serves the `aoti` backend: its graphs are AOTInductor packages
(ldlm.runtimes.aoti_runtime) behind the same interface, driven by the same code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldlm.model.checkpoint import Components, check_latent_stats
from ldlm.model.config import ModelConfig
from ldlm.model.decoder import load_tokenizer
from ldlm.runtimes.backends import resolve_backend
from ldlm.runtimes.onnx_parts import OnnxDecoder, OnnxEncoder, OnnxReverse, native_decode
from ldlm.runtimes.onnx_session import Graph, OnnxOptions, resolve_provider


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
        length = 1 if config.condition == "label" else "length"
        reverse.condition_graph.expect_shape("condition_tokens", ["batch", length, config.d_model], "model config")
        if reverse.condition_kv_graph is None:
            reverse.graph.expect_shape("condition_tokens", ["batch", "length", config.d_model], "model config")
        else:
            width = 2 * config.n_layers * config.d_model  # every block's keys and values
            reverse.graph.expect_shape("condition_kv", ["batch", "length", width], "model config")
            reverse.condition_kv_graph.expect_shape("condition_tokens", ["batch", "length", config.d_model],
                                                    "model config")
            reverse.condition_kv_graph.expect_shape("condition_kv", ["batch", "length", width], "model config")
    if config.condition == "text":
        encoder.graph.expect_shape("token_states", ["batch", "length", encoder.hidden_size], "model config")


def _condition_parts(directory: Path, manifest: dict, specs: dict, config: ModelConfig, graph,
                     device: torch.device) -> tuple[Graph | None, torch.Tensor | None, Graph | None]:
    """A conditional model's condition graph, null condition (1, d_model) and, for a cross-attention model's
    export that holds it, the graph that projects a condition to its blocks' keys and values (else None);
    (None, None, None) for an unconditional model."""
    from ldlm.export.manifest import ExportError

    if config.condition is None:
        return None, None, None
    if "condition" not in specs or "null_condition" not in manifest:
        raise ExportError(f"{directory} holds a {config.condition}-conditioned model but no condition graph or null "
                          "condition: export the checkpoint again with `ldlm export`")
    # a cross-attention model's export reads its condition projected once (condition_kv); one made before that
    # graph existed reads tokens and projects them at every step, as it always did
    projects = config.condition_attention == "cross" and "condition_kv" in specs
    try:
        null = torch.tensor(manifest["null_condition"], dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ExportError(f"{directory / 'manifest.json'} has a malformed null_condition ({e}): re-run "
                          "`ldlm export`") from e
    if tuple(null.shape) != (1, config.d_model):
        raise ExportError(f"{directory / 'manifest.json'}: null_condition must be (1, {config.d_model}), not "
                          f"{tuple(null.shape)}: re-run `ldlm export`")
    return graph("condition"), null.to(device), graph("condition_kv") if projects else None


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
