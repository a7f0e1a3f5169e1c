"""The engine's sampling loop on a conditional model (issue 18): the folded step reading the condition's keys
and values from static buffers, and a guided run's two branches as one batched forward, against the reference
samplers with ldlm.sampling.guidance, same seed and noise: fp32 latents within 1e-5. On CPU the loop runs eagerly
through the Triton interpreter; tests/test_gpu.py runs the same comparison with CUDA graphs."""

from __future__ import annotations

import pytest
import torch

import ldlm
from ldlm.fast.buckets import next_power_of_two
from ldlm.fast.folded_reverse import FoldedReverse
from ldlm.fast.fused_sampler import FusedSampler
from ldlm.fast.step_tables import sampler_tables
from ldlm.model.config import ModelConfig
from ldlm.model.reverse import ReverseTransformer
from ldlm.model.schedule import NoiseSchedule
from ldlm.sampling.guidance import guided_denoiser
from ldlm.sampling.samplers import SAMPLERS

from .test_conditional import some_condition, text_checkpoint, train_conditional  # noqa: F401 (fixture)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAPHS = [False] + ([True] if DEVICE == "cuda" else [])


def conditional_model(condition: str, **config) -> ReverseTransformer:
    torch.manual_seed(0)
    labels = ["a", "b", "c"] if condition == "label" else None
    cfg = ModelConfig.from_preset("tiny", condition=condition, condition_attention="cross", labels=labels, **config)
    return ReverseTransformer(cfg).to(DEVICE).eval()


def reference_and_engine(model, condition, guidance, sampler, steps, graphs=False, seed=7):
    schedule = NoiseSchedule.linear().to(DEVICE)
    B = 3 if condition is None else condition.tokens.shape[0]
    shape = model.config.latent_shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(B, *shape, generator=g, device=DEVICE)
    extra = {"eta": 1.0} if sampler == "ddim" else {}
    expected = SAMPLERS[sampler](guided_denoiser(model, condition, guidance), x, schedule, steps=steps, generator=g,
                                 disable=True, **extra)
    engine = FusedSampler(model, sampler_tables(sampler, schedule.to("cpu"), steps=steps, **extra), device=DEVICE,
                          graphs=graphs)
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(B, *shape, generator=g, device=DEVICE)
    return expected, engine(x, g, condition=condition, guidance=guidance), engine


@pytest.mark.parametrize("graphs", GRAPHS)
@pytest.mark.parametrize("guidance", [0.0, 1.0, 2.5])
@pytest.mark.parametrize("kind", ["text", "label"])
@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 12), ("dpm++2m", 10)])
def test_the_engine_loop_reads_the_condition_as_the_reference(kind, guidance, sampler, steps, graphs):
    model = conditional_model(kind)
    with torch.no_grad():
        condition = some_condition(model.cpu(), 4)
    model.to(DEVICE)
    condition = type(condition)(condition.tokens.to(DEVICE), condition.mask.to(DEVICE))
    expected, got, _ = reference_and_engine(model, condition, guidance, sampler, steps, graphs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [{"self_condition": True}, {"latent_tokens": 2}])
def test_guided_self_conditioned_and_multi_token_models(config):
    model = conditional_model("text", **config)
    with torch.no_grad():
        condition = some_condition(model.cpu(), 2)
    model.to(DEVICE)
    expected, got, _ = reference_and_engine(model, condition, 3.0, "dpm++2m", 8)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_condition_is_the_null_condition():
    model = conditional_model("label")
    expected, got, _ = reference_and_engine(model, None, 1.0, "ddim", 10)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_one_buffer_serves_every_condition_length_of_its_bucket():
    model = conditional_model("text")
    assert [next_power_of_two(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    with torch.no_grad():
        short, long = some_condition(model, 2, length=5), some_condition(model, 2, length=7)
    expected, got, engine = reference_and_engine(model, short, 2.0, "ddim", 6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    expected, got, _ = reference_and_engine(model, long, 2.0, "ddim", 6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    x = torch.zeros(2, 32, device=DEVICE)
    engine(x, torch.Generator(device=DEVICE), condition=long, guidance=2.0)
    assert len(engine._buffers) == 1  # lengths 5 and 7 share the bucket of 8 (2 items, guided)


@pytest.mark.parametrize("fused_blocks", [False, True])  # True: every matmul one Triton kernel (interpreter on CPU)
def test_the_precomputed_keys_and_values_are_the_models_cross_attention(fused_blocks):
    model = conditional_model("text")
    folded = FoldedReverse(model, torch.tensor([999.0, 500.0, 20.0], device=DEVICE), fused_blocks=fused_blocks)
    x = torch.randn(2, 32, device=DEVICE)
    with torch.no_grad():
        condition = some_condition(model, 2)
        for step, t in enumerate((999.0, 500.0, 20.0)):
            torch.testing.assert_close(
                folded(x, torch.tensor([step], device=DEVICE), condition=folded.condition_states(condition)),
                model(x, torch.full((2,), t, device=DEVICE), condition=condition), rtol=1e-5, atol=1e-5)


def test_bad_engine_conditions_are_refused():
    model = conditional_model("text")
    engine = FusedSampler(model, sampler_tables("ddim", NoiseSchedule.linear(), steps=3), device=DEVICE)
    with torch.no_grad():
        condition = some_condition(model, 2)
    with pytest.raises(ValueError, match="2 rows for 3 latents"):
        engine(torch.zeros(3, 32, device=DEVICE), condition=condition)
    plain = ReverseTransformer(ModelConfig.from_preset("tiny")).eval()
    with pytest.raises(ValueError, match="unconditional"):
        FusedSampler(plain, sampler_tables("ddim", NoiseSchedule.linear(), steps=3), device=DEVICE)(
            torch.zeros(2, 32), condition=condition)
    joint = ReverseTransformer(ModelConfig.from_preset("tiny", condition="text", condition_attention="joint"))
    with pytest.raises(ValueError, match="joint"):
        FoldedReverse(joint.eval(), torch.tensor([1.0]))


@pytest.mark.parametrize("backend", ["fused"] + (["cuda-graph"] if DEVICE == "cuda" else []))
def test_the_engine_backends_generate_from_sources_as_the_reference(text_checkpoint, backend):  # noqa: F811
    reference = ldlm.load(text_checkpoint, device=DEVICE, backend="reference")
    fused = ldlm.load(text_checkpoint, device=DEVICE, backend=backend)
    assert "reference samplers" not in fused.backend_reason
    for guidance in (1.0, 2.0):
        kwargs = {"sources": ["about cat", "about the sun today"], "sampler": "ddim", "steps": 5, "seed": 3,
                  "guidance": guidance, "progress": False}
        torch.testing.assert_close(fused.sample_latents(2, **kwargs), reference.sample_latents(2, **kwargs),
                                   rtol=1e-5, atol=1e-5)
        assert fused.generate_from(**kwargs) == reference.generate_from(**kwargs)
    seeds = {"seeds": [4, 9], "sampler": "dpm++2m", "steps": 6, "progress": False}
    assert fused.generate_from(["about cat", "about dog"], **seeds) == \
        reference.generate_from(["about cat", "about dog"], **seeds)
    assert fused.vary(["the cat sat."], 0.5, sources=["about dog"], seed=2, progress=False) == \
        reference.vary(["the cat sat."], 0.5, sources=["about dog"], seed=2, progress=False)


def test_a_joint_attention_model_loops_on_the_reference_samplers(tmp_path):
    out = tmp_path / "joint"
    train_conditional(out, "text", attention="joint")
    reference = ldlm.load(out, device=DEVICE, backend="reference")
    fused = ldlm.load(out, device=DEVICE, backend="fused")
    assert "joint attention" in fused.backend_reason
    kwargs = {"sources": ["about cat", "about sun"], "sampler": "ddim", "steps": 5, "seed": 3, "progress": False}
    torch.testing.assert_close(fused.sample_latents(2, **kwargs), reference.sample_latents(2, **kwargs), rtol=0,
                               atol=0)
    assert fused.generate_from(**kwargs) == reference.generate_from(**kwargs)
