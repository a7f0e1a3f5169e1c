"""ONNX export and the ONNX Runtime backend against the PyTorch reference.

Tolerances: fp32 graphs within 1e-5 (relative to the largest magnitude) of their modules; fp16 graphs within
2e-2; end to end in fp32, latents within 1e-5 and the same decoded tokens as the reference path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test extra")  # installed by .ci/run

import ldlm
from ldlm.cli import main
from ldlm.export.manifest import ExportError, hash_files
from ldlm.export.onnx_export import export_checkpoint, export_graph
from ldlm.model.checkpoint import load_checkpoint
from ldlm.model.config import ModelConfig
from ldlm.model.decoder import LatentDecoder
from ldlm.model.reverse import ReverseTransformer
from ldlm.runtimes.backends import BackendUnavailable
from ldlm.runtimes.onnx_parts import OnnxCache, OnnxDecoder, OnnxReverse
from ldlm.runtimes.onnx_runtime import load_export_components
from ldlm.runtimes.onnx_session import Graph, OnnxOptions
from ldlm.sampling.beam_search import BeamSearchConfig, beam_search

from .conftest import TINY_TEXTS, assert_threads_get_their_own_results

CPU = torch.device("cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    export_checkpoint(tiny_checkpoint, out, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def onnx_parts(exported):
    return {dtype: load_export_components(exported, CPU, dtype)[0] for dtype in (torch.float32, torch.float16)}


def test_manifest_lists_graphs_versions_and_hashes(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["opset"] == 18 and manifest["versions"]["torch"] == torch.__version__
    assert set(manifest["graphs"]) == {"float32", "float16", "int8"}
    assert set(manifest["graphs"]["int8"]) == {"reverse", "decoder_step"}
    step = manifest["graphs"]["float32"]["decoder_step"]
    layers = manifest["decoder"]["n_layer"]
    assert [i["name"] for i in step["inputs"]] == ["input_ids", "position_ids", "past_mask", *(
        f"past_{kind}_{layer}" for layer in range(layers) for kind in ("key", "value"))]
    assert [o["name"] for o in step["outputs"]] == ["logits", "new_kv"]
    assert step["inputs"][3]["dtype"] == "float32" and len(step["inputs"][3]["shape"]) == 4
    assert manifest["graphs"]["float16"]["decoder_step"]["inputs"][3]["dtype"] == "float16"  # cache in compute dtype
    assert isinstance(step["inputs"][0]["shape"][0], str)  # the batch axis is dynamic
    assert isinstance(step["inputs"][3]["shape"][3], str)  # so is the cache's capacity
    assert manifest["files"] == hash_files(exported) and "decoder_tokenizer/tokenizer.json" in manifest["files"]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_encoder_graph_matches_the_module(reference, onnx_parts, dtype, tol):
    for texts in (TINY_TEXTS[:1], TINY_TEXTS[:3] + ["a much longer sentence than the others, padded less"]):
        assert rel_err(onnx_parts[dtype].encoder.encode(texts), reference.encoder.encode(texts)) < tol


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_reverse_graph_matches_the_module(reference, onnx_parts, dtype, tol):
    g = torch.Generator().manual_seed(0)
    for batch in (1, 4, 7):
        x, t = torch.randn(batch, 32, generator=g), torch.rand(batch, generator=g) * 999
        with torch.no_grad():
            expected = reference.reverse(x, t)
        assert rel_err(onnx_parts[dtype].reverse(x, t), expected) < tol


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_decoder_graphs_match_the_module(reference, onnx_parts, dtype, tol):
    decoder, onnx_decoder = reference.decoder, onnx_parts[dtype].decoder
    g = torch.Generator().manual_seed(1)
    for batch in (1, 5):
        latents = torch.randn(batch, 32, generator=g)
        with torch.no_grad():
            logits, cache = decoder.prefill(latents)
        onnx_logits, onnx_cache = onnx_decoder.prefill(latents)
        assert rel_err(onnx_logits, logits) < tol
        for length in range(20):  # past the cache's first capacity (prefix + 16): it grows once
            ids = torch.randint(0, 200, (batch, 1), generator=g)
            with torch.no_grad():
                logits, cache = decoder.step(ids, cache)
            onnx_logits, onnx_cache = onnx_decoder.step(ids, onnx_cache)
            assert rel_err(onnx_logits, logits) < tol, (batch, length)
        S = onnx_cache.length
        assert S == 2 + 20 and onnx_cache.capacity == 2 + 2 * OnnxCache.GROW  # grew once, from 18 slots to 34
        assert onnx_cache.mask[:, :S].all() and not onnx_cache.mask[:, S:].any()
        for layer, hf in enumerate(cache.layers):  # HF: (R, H, S, hd); ours: keys (R, H, hd, C), values (R, H, C, hd)
            assert rel_err(onnx_cache.keys[layer][..., :S].transpose(-1, -2), hf.keys) < tol
            assert rel_err(onnx_cache.values[layer][:, :, :S], hf.values) < tol


def test_prefill_once_per_item_gives_the_repeated_rows_prefill(reference, onnx_parts):
    """prefill(latents, repeats=K), which the native beam search uses (the prefix run once per item, copied to
    its K beams), against the prefill of the K-times repeated rows: the same logits and cache, and the next
    step's logits, for the module and the graphs."""
    g = torch.Generator().manual_seed(5)
    latents, ids = torch.randn(3, 32, generator=g), torch.randint(0, 200, (12, 1), generator=g)
    for decoder in (reference.decoder, onnx_parts[torch.float32].decoder):
        with torch.no_grad():
            once, once_cache = decoder.prefill(latents, repeats=4)
            rows, rows_cache = decoder.prefill(latents.repeat_interleave(4, dim=0))
            assert once.shape == rows.shape == (12, rows.shape[1])
            assert rel_err(once, rows) < 1e-6, type(decoder).__name__
            assert rel_err(decoder.step(ids, once_cache)[0], decoder.step(ids, rows_cache)[0]) < 1e-6


def test_step_graph_is_bound_once_per_cache_capacity(reference, onnx_parts, monkeypatch):
    """Tokens written in place into one input tensor (as the native search does) reuse the step's binding until
    the cache grows; a new tensor each step, or a strided one (bound as a copy), rebinds; the results are the
    module's in every case."""
    from ldlm.runtimes.onnx_parts import StepRun

    binds = []
    monkeypatch.setattr(StepRun, "bind", lambda *a, bind=StepRun.bind: binds.append(1) or bind(*a))
    decoder, onnx_decoder = reference.decoder, onnx_parts[torch.float32].decoder
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 32, generator=g)
    for inputs, expected_binds in (("in place", 2), ("new tensors", 20), ("strided, in place", 20)):
        binds.clear()
        with torch.no_grad():
            _, cache = decoder.prefill(latents)
        _, onnx_cache = onnx_decoder.prefill(latents)
        contiguous, strided = torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)[:, 1:2]
        for _ in range(20):  # the cache grows once, at 18 slots
            new = torch.randint(0, 200, (2, 1), generator=g)
            ids = {"in place": lambda: contiguous.copy_(new), "new tensors": lambda: new,
                   "strided, in place": lambda: strided.copy_(new)}[inputs]()  # copy_ returns the same tensor
            with torch.no_grad():
                logits, cache = decoder.step(ids, cache)
            onnx_logits, onnx_cache = onnx_decoder.step(ids, onnx_cache)
            assert rel_err(onnx_logits, logits) < 1e-5, inputs
        assert len(binds) == expected_binds, inputs


def test_beam_search_on_the_graphs_gives_the_reference_tokens(tmp_path):
    """A random decoder (varied, non-empty hypotheses): the same tokens through ONNX Runtime."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny")
    decoder = LatentDecoder.build(config, TINY_TEXTS).eval()
    for p in decoder.parameters():
        p.data.normal_(0, 0.5)
    parts = dataclasses.make_dataclass("Parts", ["config", "decoder"])(config, decoder)
    specs = {name: export_graph(parts, name, tmp_path / f"{name}.onnx") for name in ("decoder_prefill", "decoder_step")}
    gpt2 = decoder.gpt2.config
    spec = {"eos_token_id": decoder.eos_token_id, "pad_token_id": decoder.pad_token_id, "n_layer": gpt2.n_layer,
            "n_head": gpt2.n_head, "head_dim": gpt2.n_embd // gpt2.n_head, "vocab_size": gpt2.vocab_size,
            "n_positions": gpt2.n_positions}
    graphs = [Graph(tmp_path / specs[n]["file"], specs[n], "cpu", OnnxOptions()) for n in specs]
    onnx_decoder = OnnxDecoder(*graphs, decoder.tokenizer, spec, config, CPU)
    native_decoder = OnnxDecoder(*graphs, decoder.tokenizer, spec, config, CPU, native=True)  # the C bookkeeping
    latents = torch.randn(5, 32)
    for search in (BeamSearchConfig(num_beams=3, max_new_tokens=12), BeamSearchConfig(num_beams=1, max_new_tokens=9)):
        expected = beam_search(decoder, latents, search)
        assert any(expected) and beam_search(onnx_decoder, latents, search) == expected
        assert native_decoder.beam_search(latents, search) == expected


def test_self_conditioned_reverse_graph_takes_the_previous_estimate(tmp_path, caplog):
    config = dataclasses.replace(ModelConfig.from_preset("tiny"), self_condition=True)
    torch.manual_seed(0)
    reverse = ReverseTransformer(config).eval()
    parts = dataclasses.make_dataclass("Parts", ["config", "reverse"])(config, reverse)
    with caplog.at_level(logging.WARNING):
        spec = export_graph(parts, "reverse", tmp_path / "reverse.onnx")
    assert not [r.getMessage() for r in caplog.records if "torchvision" in r.getMessage()]  # off-topic notes
    assert [i["name"] for i in spec["inputs"]] == ["x_t", "t", "x0_prev"]
    onnx_reverse = OnnxReverse(Graph(tmp_path / "reverse.onnx", spec, "cpu", OnnxOptions()), config)
    x, t, prev = torch.randn(3, 32), torch.tensor([1.0, 500.0, 999.0]), torch.randn(3, 32)
    with torch.no_grad():
        assert rel_err(onnx_reverse(x, t, prev), reverse(x, t, prev)) < 1e-5
        assert rel_err(onnx_reverse(x, t), reverse(x, t)) < 1e-5  # None: zeros, as the module does


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", None), ("ddim", 20), ("dpm++2m", 12)])
def test_onnx_pipeline_matches_the_reference_end_to_end(tiny_checkpoint, exported, sampler, steps):
    ref, onnx = ldlm.load(tiny_checkpoint), ldlm.load(exported)
    assert onnx.backend == "onnx" and "CPUExecutionProvider" in onnx.backend_reason
    assert "beam bookkeeping in ldlm's C kernel" in onnx.backend_reason  # CI has a C compiler
    kwargs = {"sampler": sampler, "steps": steps, "seed": 3, "progress": False}
    expected, got = ref.sample_latents(4, **kwargs), onnx.sample_latents(4, **kwargs)
    assert rel_err(got, expected) < 1e-5
    latents = expected * 3  # scaled to reach varied decodes of the briefly trained decoder
    assert onnx.decode(latents, progress=False) == ref.decode(latents, progress=False)
    assert onnx.decode(latents, top_p=0.9, seed=2, progress=False) == ref.decode(latents, top_p=0.9, seed=2,
                                                                                 progress=False)
    assert onnx.vary(TINY_TEXTS[:3], strength=0.4, progress=False) == ref.vary(TINY_TEXTS[:3], strength=0.4,
                                                                              progress=False)


def _int8_matmuls(path) -> tuple[int, str]:
    """(how many MatMuls of a graph file are int8, the kind of the last matrix product before its output)."""
    import onnx

    graph = onnx.load(str(path)).graph
    producers = {name: node for node in graph.node for name in node.output}
    node = producers[graph.output[0].name]
    while "MatMul" not in node.op_type and node.op_type != "Gemm":
        node = next(producers[name] for name in node.input if name in producers)
    return sum(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in graph.node), node.op_type


def test_int8_graphs_are_close_to_fp32(exported):
    # the blocks' MatMuls are int8, the last product before the output (the reverse transformer's output
    # projection, the decoder's LM head) stays fp32 (ldlm.export.onnx_export.quantize_int8 says why)
    config = ModelConfig.from_dict(json.loads((exported / "manifest.json").read_text())["model"])
    for name, layers in (("reverse", config.n_layers), ("decoder_step", config.n_layer)):
        quantized, last = _int8_matmuls(exported / f"{name}.int8.onnx")
        assert quantized >= 2 * layers and last in ("MatMul", "Gemm"), (name, quantized, last)
    fp32 = ldlm.load(exported)
    int8 = ldlm.load(exported, onnx_options=OnnxOptions(int8_reverse=True, int8_decoder=True))
    assert "int8 reverse + int8 decoder_step graphs" in int8.backend_reason
    assert "int8 graphs are here too" in fp32.backend_reason  # the faster option is named, not imposed
    # quantized: not equal, but near, next to how far apart two inputs' outputs lie (a 64-wide tiny model
    # quantizes coarsely: its reverse transformer's int8 error is 0.12-0.2 relative, its decoder step's 0.04)
    g = torch.Generator().manual_seed(0)
    x, other, t = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g), torch.full((6,), 300.0)
    expected = fp32.reverse(x, t)
    assert 0 < rel_err(int8.reverse(x, t), expected) < 0.3 * rel_err(fp32.reverse(other, t), expected)
    latents, other = torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g)

    def step_logits(pipe, latents):
        _, cache = pipe.decoder.prefill(latents)  # the prefill graph is fp32 in both
        return pipe.decoder.step(torch.tensor([[5], [6], [7]]), cache)[0]

    expected = step_logits(fp32, latents)
    assert 0 < rel_err(step_logits(int8, latents), expected) < 0.3 * rel_err(step_logits(fp32, other), expected)


def _copy(exported, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(exported, target)
    return target


def _rehash(directory):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = hash_files(directory)
    path.write_text(json.dumps(manifest))


def test_bad_exports_fail_at_load_with_what_to_do(exported, tmp_path):
    broken = _copy(exported, tmp_path)
    (broken / "reverse.onnx").unlink()
    with pytest.raises(ExportError, match=r"reverse.onnx is missing.*re-run `ldlm export`"):
        ldlm.load(broken)

    broken = _copy(exported, tmp_path / "hash")
    (broken / "decoder_step.onnx").write_bytes(b"not a graph")
    with pytest.raises(ExportError, match="decoder_step.onnx does not match its hash"):
        ldlm.load(broken)
    _rehash(broken)  # a corrupt graph whose manifest was rewritten: ONNX Runtime's own check names it
    with pytest.raises(ValueError, match="decoder_step.onnx could not be loaded by ONNX Runtime"):
        ldlm.load(broken)

    broken = _copy(exported, tmp_path / "swap")
    shutil.copy(broken / "encoder.onnx", broken / "reverse.onnx")
    _rehash(broken)
    with pytest.raises(ValueError, match="reverse.onnx does not match manifest.json"):
        ldlm.load(broken)

    old = _copy(exported, tmp_path / "old")  # the manifest of an export whose step graph took the cache as one tensor
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["graphs"]["float32"]["decoder_step"]["inputs"][3:] = [{"name": "past", "dtype": "float32", "shape": []}]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="exported by an older ldlm.*export the checkpoint again"):
        ldlm.load(old)

    broken = _copy(exported, tmp_path / "json")
    (broken / "manifest.json").write_text("{")
    with pytest.raises(ExportError, match="not valid JSON"):
        ldlm.load(broken)


def test_backend_and_provider_errors(tiny_checkpoint, exported):
    with pytest.raises(BackendUnavailable, match="ldlm export CHECKPOINT OUTDIR"):
        ldlm.load(tiny_checkpoint, backend="onnx")
    with pytest.raises(BackendUnavailable, match="only backend 'onnx' runs"):
        ldlm.load(exported, backend="reference")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailable, match=r"ldlm\[onnx-gpu\]|pip uninstall -y onnxruntime"):
            ldlm.load(exported, onnx_options=OnnxOptions(provider="cuda"))
    if not torch.cuda.is_available():  # ONNX Runtime falls back to the CPU when CUDA cannot start: refused
        spec = json.loads((exported / "manifest.json").read_text())["graphs"]["float32"]["reverse"]
        with pytest.raises(BackendUnavailable, match="could not start CUDAExecutionProvider for reverse.onnx"):
            with warnings.catch_warnings():  # the CPU build also warns that it has no such provider
                warnings.simplefilter("ignore")
                Graph(exported / spec["file"], spec, "cuda", OnnxOptions())
    with pytest.raises(ExportError, match="no torch.bfloat16 graphs"):
        ldlm.load(exported, dtype="bfloat16")
    with pytest.raises(FileExistsError, match="already holds an export"):
        export_checkpoint(tiny_checkpoint, exported)


def test_cli_export_then_generate_with_onnx(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(tiny_checkpoint), str(out), "--no-fp16", "--no-int8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"float32"}
    assert main(["generate", str(out), "-n", "2", "--sampler", "ddim", "--steps", "5", "--json", "--no-progress",
                 "--onnx-threads", "1"]) == 0
    assert main(["generate", str(tiny_checkpoint), "--backend", "onnx"]) == 2  # a checkpoint: export it first
    captured = capsys.readouterr()
    assert len([line for line in captured.out.splitlines() if line.startswith("{")]) == 2
    assert "backend: onnx (CPUExecutionProvider" in captured.err
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hashes"] == "verified" and info["graphs"]["float32"]["reverse"]["outputs"] == ["x0_hat"]


def test_model_config_reads_without_weights_from_either_directory(tiny_checkpoint, exported):
    from ldlm.pipeline import read_model_config

    assert read_model_config(exported) == read_model_config(tiny_checkpoint) == ldlm.load(tiny_checkpoint).config


def test_threads_sharing_an_onnx_pipeline_get_their_own_results(exported):
    """ONNX Runtime sessions run concurrently; every call binds its own inputs, outputs and KV cache."""
    assert_threads_get_their_own_results(ldlm.load(exported))


def test_evaluate_runs_on_the_onnx_backend(exported):
    """`ldlm eval EXPORT`: reconstruction and samples as usual; teacher-forced accuracy needs the PyTorch decoder."""
    from ldlm.evaluation.evaluate import EvalSettings, evaluate, format_table
    from ldlm.model.encoder import build_tiny_encoder

    result = evaluate(TINY_TEXTS[:16], TINY_TEXTS, pipe=ldlm.load(exported), feature_encoder=build_tiny_encoder(32),
                      settings=EvalSettings(num_samples=6, sampler="ddim", steps=5), progress=False)
    model = result["rows"]["model"]
    assert model["reconstruction"]["token_accuracy"] is None and 0 <= model["reconstruction"]["bleu"] <= 100
    assert model["samples"]["n"] == 6
    assert format_table(result).splitlines()[2].split(" | ")[3] == "-"  # the model row's token_accuracy cell


def test_static_inputs_bind_once_per_shape_with_a_graph_id_each(reference, onnx_parts, monkeypatch):
    """What ORT's CUDA graphs need, on the CPU build: each input shape bound once to buffers of its own (a graph
    id each: gpu_graph_id), every call's inputs copied in and the output copied out; the same results as a
    binding per call, none aliasing another."""
    from ldlm.runtimes import onnx_session

    graph = onnx_parts[torch.float32].reverse.graph
    binds = []

    def counted(self, inputs, outputs, graph_id=None, bind=onnx_session.Graph.bind):
        binds.append((tuple(inputs["x_t"].shape), graph_id))
        return bind(self, inputs, outputs, graph_id=graph_id)

    monkeypatch.setattr(onnx_session.Graph, "bind", counted)
    static = OnnxReverse(graph, reference.config, static_inputs=True)
    plain = OnnxReverse(graph, reference.config)
    g = torch.Generator().manual_seed(4)
    results = []
    for batch in (1, 4, 1, 4, 4):
        x, t = torch.randn(batch, 32, generator=g), torch.rand(batch, generator=g) * 999
        got = static(x, t)
        assert torch.equal(got, plain(x, t))
        results.append(got)
    assert [b for b in binds if b[1] is not None] == [((1, 32), 0), ((4, 32), 1)]  # the plain calls bind each time
    assert len({r.data_ptr() for r in results}) == len(results)  # copies: a sampler may keep the last x0_hat


def test_cuda_graph_and_provider_options_say_what_to_fix(exported, monkeypatch):
    from ldlm.runtimes import onnx_session

    with pytest.raises(ValueError, match="cuda_graph replays the reverse graph on the GPU: use provider 'cuda'"):
        OnnxOptions(provider="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match=r"may not set \['use_tf32'\]"):
        OnnxOptions(cuda_provider_options={"use_tf32": "1"})
    with pytest.raises(BackendUnavailable, match="cuda_graph replays the reverse graph on the GPU: pass device='cuda'"):
        ldlm.load(exported, onnx_options=OnnxOptions(cuda_graph=True))
    options = OnnxOptions(provider="cuda", cuda_graph=True, cuda_provider_options={"arena_extend_strategy": "kSameAsRequested"})
    assert onnx_session.cuda_provider_options(options, 1, cuda_graph=True) == {
        "arena_extend_strategy": "kSameAsRequested", "device_id": "1", "use_tf32": "0", "enable_cuda_graph": "1"}
    assert "enable_cuda_graph" not in onnx_session.cuda_provider_options(options, 0, cuda_graph=False)
    # both builds installed side by side: the CPU one shadows the GPU one, and the hint says to keep one
    monkeypatch.setattr("importlib.metadata.version", lambda name: "1.31.1")
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in onnx_session.gpu_install_hint()


def test_a_cache_that_cannot_be_made_leaves_the_onnx_export_loadable(exported, tmp_path):
    """The C beam helper is an optimisation: with LDLM_CACHE a file (or a read-only home), the export loads and
    decodes, the helper built in a private temporary folder, the load's reason saying why (issue 37)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = (f"import ldlm; p = ldlm.load({str(exported)!r}); print(p.backend_reason); "
            "print(p.generate(1, sampler='ddim', steps=2, progress=False))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LDLM_CACHE": str(blocker)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "private temporary folder" in done.stdout and "Not a directory" in done.stdout


def test_an_export_whose_latent_std_is_nan_or_zero_is_refused(exported, tmp_path):
    """The one check the checkpoint loader runs (ldlm.model.checkpoint.check_latent_stats), on the manifest's copy."""
    for bad in (float("nan"), 0.0):
        broken = _copy(exported, tmp_path / str(bad))
        manifest = json.loads((broken / "manifest.json").read_text())
        std = manifest["latent_stats"]["std"]
        manifest["latent_stats"]["std"] = [bad] * len(std)
        (broken / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match=r"manifest.json latent_stats: the latent std is .* in dimension 0"):
            ldlm.load(broken)
