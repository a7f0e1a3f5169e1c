"""The `compiled` backend (ldlm.fast.compiled): the reference modules through torch.compile, against the reference
with the same seed and noise: fp32 latents within 1e-5, identical text; shapes bucketed, so a loop and every
batch size within a bucket run what was compiled once."""

from __future__ import annotations

import pytest
import torch

import ldlm
from ldlm.runtimes.backends import BackendUnavailable, resolve_backend

from .test_conditional import SOURCES, text_checkpoint, train_conditional  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def pipes(tiny_checkpoint):
    return ldlm.load(tiny_checkpoint), ldlm.load(tiny_checkpoint, backend="compiled")


def test_compiled_samples_and_decodes_as_the_reference(pipes):
    reference, compiled = pipes
    for n in (3, 4):  # one bucket (4 rows): the second call compiles nothing
        expected = reference.sample_latents(n, sampler="ddim", steps=12, seed=5, progress=False)
        got = compiled.sample_latents(n, sampler="ddim", steps=12, seed=5, progress=False)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert compiled.decode(expected, progress=False) == reference.decode(expected, progress=False)
    assert set(compiled.compile_times.seconds) == {"reverse rows=4", "beam step rows=16 cache=0",
                                                   "beam step rows=16 cache=1"}
    with torch._dynamo.config.patch(error_on_recompile=True):  # steady state: another sampler, nothing recompiles
        got = compiled.generate(3, sampler="dpm++2m", steps=8, seed=1, progress=False)
    assert got == reference.generate(3, sampler="dpm++2m", steps=8, seed=1, progress=False)


def test_compiled_reads_conditions_with_guidance_as_the_reference(text_checkpoint):  # noqa: F811
    reference, compiled = ldlm.load(text_checkpoint), ldlm.load(text_checkpoint, backend="compiled")
    sources = SOURCES[:3]
    for w in (1.0, 2.0):  # w = 2: conditional and null rows in one 2B-row forward, its own bucket
        expected = reference.sample_latents(3, sources=sources, guidance=w, sampler="ddim", steps=8, seed=2,
                                            progress=False)
        got = compiled.sample_latents(3, sources=sources, guidance=w, sampler="ddim", steps=8, seed=2, progress=False)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_compiled_is_float32_and_names_what_it_needs(tiny_checkpoint, monkeypatch):
    with pytest.raises(ValueError, match="compiled backend runs in float32 only"):
        ldlm.load(tiny_checkpoint, backend="compiled", dtype="bfloat16")
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(BackendUnavailable, match="C\\+\\+ compiler"):
        resolve_backend("compiled", torch.device("cpu"))
