"""CUDA-only checks (run by bench/gpu_check.sh on a GPU machine; skipped where there is no CUDA device):
graphed sampling and graphed beam decode against the reference, fp32, same seed and noise."""

from __future__ import annotations

import pytest
import torch

import ldlm
from ldlm.fast.static_beam_search import StaticBeamSearch
from ldlm.sampling.beam_search import BeamSearchConfig, beam_search

from .conftest import assert_threads_get_their_own_results

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture()
def gpu_pipelines(tiny_checkpoint):
    return (ldlm.load(tiny_checkpoint, device="cuda", backend="reference"),
            ldlm.load(tiny_checkpoint, device="cuda", backend="cuda-graph"))


@pytest.mark.parametrize("n", [1, 3, 8, 64, 100])  # 3 and 100 run padded to the graphs' batch buckets, 4 and 128
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 50, 0.0), ("ddim", 50, 1.0),
                                                  ("dpm++2m", 20, 0.0)])
def test_graphed_latents_and_text_match_reference(gpu_pipelines, n, sampler, steps, eta):
    reference, graphed = gpu_pipelines
    assert graphed.backend == "cuda-graph"
    kwargs = dict(sampler=sampler, steps=steps, eta=eta, seed=4, progress=False)
    expected = reference.sample_latents(n, **kwargs)
    for _ in range(2):  # the second call replays graphs captured by the first
        got = graphed.sample_latents(n, **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert graphed.decode(got, progress=False) == reference.decode(expected, progress=False)


def test_threads_sharing_a_graphed_pipeline_get_their_own_results(tiny_checkpoint):
    """Threads take turns on the engine's static buffers; the first call's capture tolerates the other threads'
    work (drawing x_T, scaling latents) on the GPU meanwhile."""
    assert_threads_get_their_own_results(ldlm.load(tiny_checkpoint, device="cuda", backend="cuda-graph"))


def test_warmup_captures_every_graph_later_calls_of_its_sizes_replay(tiny_checkpoint):
    pipe = ldlm.load(tiny_checkpoint, device="cuda", backend="cuda-graph")

    def graphs():  # captured so far: the sampling loop's pieces per batch bucket, the decode step's per searcher
        engines = pipe._engine_cache.values()
        return (sum(len(buf.graphs) for e in engines for buf in getattr(e, "_buffers", {}).values())
                + sum(len(getattr(e, "_graphs", [])) for e in engines))

    pipe.warmup((1, 3, 64), sampler="ddim", steps=10)
    captured = graphs()
    assert captured > 0
    for n in (3, 4, 1, 64, 40):  # 4 and 40 fall in the buckets of 3 (4) and 64
        pipe.generate(n, sampler="ddim", steps=10, seed=n, progress=False)
    assert graphs() == captured


@pytest.mark.parametrize("attention", ["sdpa", "matmul", "indirect"])  # indirect: the table, not the cache, reorders
def test_graphed_beam_search_matches_reference(gpu_pipelines, attention):
    reference, _ = gpu_pipelines
    latents = torch.randn(6, reference.config.latent_dim, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    cfg = BeamSearchConfig(num_beams=4, max_new_tokens=20)
    search = StaticBeamSearch(reference.decoder, batch_size=8, config=cfg, graphs=True, attention=attention)
    expected = beam_search(reference.decoder, latents, cfg)
    assert search(latents) == expected
    assert search(latents) == expected  # replay of the captured decode step


def test_graphed_per_item_seeds_match_reference(gpu_pipelines):
    """Batch jobs' per-item seeds under CUDA graphs (the noise table path), padded to a batch bucket."""
    reference, graphed = gpu_pipelines
    kwargs = {"sampler": "ddpm", "seeds": [3, 4, 5], "progress": False}
    expected = reference.sample_latents(3, **kwargs)
    for _ in range(2):
        torch.testing.assert_close(graphed.sample_latents(3, **kwargs), expected, rtol=1e-5, atol=1e-5)


def test_graphed_latent_tokens_match_reference(tmp_path):
    """K latent tokens (B, K, D) through the captured loop and the graphed beam search."""
    from ldlm.model.config import ModelConfig
    from ldlm.training.train import train

    from .conftest import TINY_TEXTS, tiny_train_config

    train(TINY_TEXTS, tmp_path / "k2", ModelConfig.from_preset("tiny", latent_tokens=2),
          tiny_train_config(decoder_steps=20, diffusion_steps=10), progress=False, log=lambda *_: None)
    reference = ldlm.load(tmp_path / "k2", device="cuda", backend="reference")
    graphed = ldlm.load(tmp_path / "k2", device="cuda", backend="cuda-graph")
    for kwargs in ({"sampler": "ddim", "steps": 20, "seed": 1}, {"sampler": "ddpm", "seeds": [3, 4, 5]}):
        expected = reference.sample_latents(3, progress=False, **kwargs)
        assert expected.shape == (3, 2, 32)
        for _ in range(2):
            torch.testing.assert_close(graphed.sample_latents(3, progress=False, **kwargs), expected,
                                       rtol=1e-5, atol=1e-5)
    assert graphed.decode(expected * 3, progress=False) == reference.decode(expected * 3, progress=False)


def _onnx_cuda_available() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture(scope="module")
def cuda_export(tiny_checkpoint, tmp_path_factory):
    from ldlm.export.onnx_export import export_checkpoint

    return export_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny", log=lambda *_: None)


@pytest.mark.skipif(not _onnx_cuda_available(), reason="needs onnxruntime-gpu (the CUDA execution provider)")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_onnx_on_cuda_matches_reference(tiny_checkpoint, cuda_export, cuda_graph):
    """The onnx backend with the CUDA provider and IOBinding (tensors stay on the GPU) against the reference:
    fp32 latents within 1e-5, the same text; with cuda_graph, the reverse graph replayed as ORT CUDA graphs (one
    per batch: 4, then 1); the fp16 graphs' loop within 5e-2 of the fp32 reference's largest latent."""
    from ldlm.runtimes.onnx_session import OnnxOptions

    reference = ldlm.load(tiny_checkpoint, device="cuda", backend="reference")
    onnx = ldlm.load(cuda_export, device="cuda", onnx_options=OnnxOptions(cuda_graph=cuda_graph))
    assert onnx.backend == "onnx" and "CUDAExecutionProvider" in onnx.backend_reason
    assert ("CUDA graphs" in onnx.backend_reason) == cuda_graph
    for n, kwargs in ((4, {"sampler": "ddpm"}), (4, {"sampler": "ddim", "steps": 20}), (1, {"sampler": "dpm++2m"})):
        expected = reference.sample_latents(n, seed=3, progress=False, **kwargs)
        got = onnx.sample_latents(n, seed=3, progress=False, **kwargs)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    latents = reference.sample_latents(4, seed=3, progress=False, sampler="ddim", steps=20) * 3  # varied decodes
    assert onnx.decode(latents, progress=False) == reference.decode(latents, progress=False)
    half = ldlm.load(cuda_export, device="cuda", dtype="float16", onnx_options=OnnxOptions(cuda_graph=cuda_graph))
    got = half.sample_latents(4, seed=3, progress=False, sampler="ddim", steps=20)
    expected = latents / 3
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 5e-2
