"""Backend selection, and the engine's code path (backend 'fused') against the reference end to end:
same seed, same noise -> fp32 latents within 1e-5 relative and identical decoded text."""

from __future__ import annotations

import pytest
import torch

import ldlm
from ldlm.fast.buckets import batch_bucket
from ldlm.runtimes.backends import BackendUnavailable, resolve_backend

from .conftest import assert_threads_get_their_own_results

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton runs on CPU only through its interpreter


@pytest.fixture()
def pipelines(tiny_checkpoint):
    return (ldlm.load(tiny_checkpoint, device=DEVICE, backend="reference"),
            ldlm.load(tiny_checkpoint, device=DEVICE, backend="fused"))


def test_auto_on_cpu_is_reference_and_says_why():
    backend, why = resolve_backend("auto", torch.device("cpu"))
    assert backend == "reference" and "CUDA" in why and "ldlm export CKPT OUT" in why


def test_cuda_graph_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error is for machines without it")
    with pytest.raises(RuntimeError, match="backend 'cuda-graph' needs a CUDA device.*use backend='reference'"):
        resolve_backend("cuda-graph", torch.device("cpu"))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'tensorrt'"):
        resolve_backend("tensorrt", torch.device("cpu"))


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 25, 0.0), ("ddim", 25, 1.0),
                                                  ("dpm++2m", 15, 0.0)])
def test_fused_latents_and_text_match_reference(pipelines, sampler, steps, eta):
    reference, fused = pipelines
    kwargs = dict(n=4, sampler=sampler, steps=steps, eta=eta, seed=3, progress=False)
    expected, got = reference.sample_latents(**kwargs), fused.sample_latents(**kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert fused.decode(got, progress=False) == reference.decode(expected, progress=False)


def test_fused_reconstruct_and_vary_match_reference(pipelines):
    reference, fused = pipelines
    texts = ["the cat sat on the mat.", "rain fell on the quiet town.", "we ate pizza at noon."]
    assert fused.reconstruct(texts, progress=False) == reference.reconstruct(texts, progress=False)
    assert fused.vary(texts, 0.4, seed=2, progress=False) == reference.vary(texts, 0.4, seed=2, progress=False)
    dpm = {"sampler": "dpm++2m", "steps": 8, "seed": 2, "progress": False}
    torch.testing.assert_close(fused.vary_latents(texts, 0.4, **dpm), reference.vary_latents(texts, 0.4, **dpm),
                               rtol=1e-5, atol=1e-5)


def test_batch_bucket():
    assert [batch_bucket(n, 256) for n in (1, 2, 3, 8, 9, 64, 65, 256, 300)] == [1, 2, 4, 8, 16, 64, 128, 256, 256]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_engine_stays_close_to_fp32(tiny_checkpoint, dtype):
    reference = ldlm.load(tiny_checkpoint, device=DEVICE, backend="reference")
    low = ldlm.load(tiny_checkpoint, device=DEVICE, backend="fused", dtype=dtype)
    kwargs = dict(n=4, sampler="ddim", steps=20, seed=3, progress=False)
    expected, got = reference.sample_latents(**kwargs), low.sample_latents(**kwargs)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # loose by design: 20 steps of a half-precision model; the figure is relative to the latents' spread
    assert ((got - expected).norm() / expected.norm()).item() < 0.1
    assert len(low.decode(got, progress=False)) == 4


def test_reference_refuses_low_precision(tiny_checkpoint):
    with pytest.raises(ValueError, match="reference backend runs in float32 only"):
        ldlm.load(tiny_checkpoint, backend="reference", dtype="bfloat16")


def test_fused_on_cpu_needs_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="start Python with TRITON_INTERPRET=1"):
        resolve_backend("fused", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_one_pipeline_shared_by_threads_gives_each_call_its_own_result(tiny_checkpoint, backend):
    """The engine's static buffers (sampling loop, KV cache) serve one call at a time; the reference keeps no state
    between calls."""
    assert_threads_get_their_own_results(ldlm.load(tiny_checkpoint, device=DEVICE, backend=backend))


def test_warmup_allocates_what_later_calls_of_its_sizes_use(tiny_checkpoint):
    """After warmup, calls of the warmed sizes build nothing new (on CUDA: capture no graph, tests/test_gpu.py)."""
    pipe = ldlm.load(tiny_checkpoint, device=DEVICE, backend="fused")

    def built():  # engine objects and the sampling loops' buffers, one per batch shape
        samplers = [e for e in pipe._engine_cache.values() if hasattr(e, "_buffers")]
        return len(pipe._engine_cache), sum(len(e._buffers) for e in samplers)

    seconds = pipe.warmup((1, 3), sampler="ddim", steps=4)
    assert list(seconds) == [1, 3] and all(s > 0 for s in seconds.values())
    after_warmup = built()
    assert after_warmup[1] == 2  # the loop's buffers for batches of 1 and 3
    pipe.generate(3, sampler="ddim", steps=4, seed=5, progress=False)
    pipe.generate(1, sampler="ddim", steps=4, seed=6, progress=False)
    assert built() == after_warmup
