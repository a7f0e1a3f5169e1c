"""K latent tokens per text (ModelConfig.latent_tokens > 1): the resampler, training, the reference and engine
paths, checkpoints and the ONNX export, on a tiny model trained through the CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ldlm
from ldlm.cli import main
from ldlm.fast.static_beam_search import StaticBeamSearch
from ldlm.model.checkpoint import load_checkpoint
from ldlm.model.config import ModelConfig
from ldlm.model.encoder import build_tiny_encoder, pad_states
from ldlm.model.resampler import LatentResampler
from ldlm.model.reverse import ReverseTransformer
from ldlm.sampling.beam_search import BeamSearchConfig, beam_search
from ldlm.training.train import TrainConfig, Trainer, train

from .conftest import TINY_TEXTS, tiny_train_config

K = 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("k2")
    data = root / "texts.txt"
    data.write_text("\n".join(TINY_TEXTS) + "\n")
    main(["train", "--data", str(data), "--out", str(root / "model"), "--preset", "tiny", "--latent-tokens", str(K),
          "--time-budget", "0", "--decoder-steps", "80", "--diffusion-steps", "40", "--decoder-batch-size", "16",
          "--diffusion-batch-size", "32", "--no-progress"])
    return root / "model"


@pytest.fixture(scope="module")
def pipe(checkpoint):
    return ldlm.load(checkpoint)


def test_resampler_ignores_padding():
    config = ModelConfig.from_preset("tiny", latent_tokens=3, n_prefix=3)
    torch.manual_seed(0)
    resampler = LatentResampler(config).eval()
    states = [torch.randn(n, config.latent_dim) for n in (2, 7, 4)]
    hidden, mask = pad_states(states)
    with torch.no_grad():
        together = resampler(hidden, mask)  # (3, K, D)
        garbage = hidden.masked_fill(mask[:, :, None] == 0, 1e3)  # padded positions must not matter
        assert torch.allclose(resampler(garbage, mask), together, atol=1e-6)
        alone = torch.cat([resampler(s[None], torch.ones(1, len(s), dtype=torch.long)) for s in states])
    assert together.shape == (3, 3, config.latent_dim)
    assert rel_err(together, alone) < 1e-5
    assert rel_err(together[:, 0], together[:, 1]) > 1e-2  # the queries differ, so do the tokens


def test_a_texts_latent_tokens_do_not_depend_on_its_batch(pipe):
    batch = pipe.encode(TINY_TEXTS[:3] + ["a much longer sentence than the others, so they are padded"])
    assert batch.shape == (4, K, 32)
    for i, text in enumerate(TINY_TEXTS[:3]):
        assert rel_err(pipe.encode([text])[0], batch[i]) < 1e-5


def test_training_trains_the_resampler_and_the_checkpoint_keeps_it(checkpoint):
    c = load_checkpoint(checkpoint)
    assert c.config.latent_tokens == K and c.config.latent_shape == (K, 32)
    assert c.latent_mean.shape == (K, 32) and c.latent_std.shape == (K, 32)
    torch.manual_seed(2)  # build_components seeds the resampler with seed + 2
    untrained = LatentResampler(c.config)
    assert not torch.equal(untrained.queries, c.encoder.resampler.queries)
    # the statistics are those of the trained resampler's latents (normalized training latents: mean ~0, std ~1)
    z = (c.encoder.encode(TINY_TEXTS[:8]) - c.latent_mean) / c.latent_std
    assert z.mean().abs() < 0.5 and 0.5 < z.std() < 2.0


def test_reverse_transformer_tells_latent_tokens_apart():
    config = ModelConfig.from_preset("tiny", latent_tokens=3, n_prefix=3)
    torch.manual_seed(0)
    reverse = ReverseTransformer(config).eval()
    x, t = torch.randn(2, 3, 32), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        assert rel_err(reverse(x.flip(1), t), reverse(x, t).flip(1)) > 1e-3  # positions matter
    assert "pos_emb" not in dict(ReverseTransformer(ModelConfig.from_preset("tiny")).named_parameters())


# the multistep solver's history and DDIM (the noise draws with K tokens: tests/test_fused_sampler.py's loops)
@pytest.mark.parametrize(("sampler", "steps"), [("dpm++2m", 12), ("ddim", 10)])
def test_engine_matches_the_reference_with_latent_tokens(checkpoint, pipe, sampler, steps):
    fused = ldlm.load(checkpoint, backend="fused")
    kwargs = {"sampler": sampler, "steps": steps, "progress": False}
    expected = pipe.sample_latents(3, seed=4, **kwargs)
    assert expected.shape == (3, K, 32)
    assert rel_err(fused.sample_latents(3, seed=4, **kwargs), expected) < 1e-5
    per_item = fused.sample_latents(3, seeds=[7, 8, 9], **kwargs)
    assert torch.equal(per_item, fused.sample_latents(3, seeds=[7, 8, 9], **kwargs))
    assert rel_err(per_item, pipe.sample_latents(3, seeds=[7, 8, 9], **kwargs)) < 1e-5


def test_beam_searches_agree_on_latent_tokens(pipe):
    latents = pipe.encode(TINY_TEXTS[:5]) * 3  # scaled to reach varied decodes of the briefly trained decoder
    search = BeamSearchConfig(num_beams=3, max_new_tokens=12)
    expected = beam_search(pipe.decoder, latents, search)
    assert any(expected)
    assert StaticBeamSearch(pipe.decoder, batch_size=8, config=search)(latents) == expected
    texts = pipe.generate(4, sampler="ddim", steps=5, progress=False)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert len(pipe.vary(TINY_TEXTS[:2], strength=0.3, progress=False)) == 2


def test_decode_names_the_expected_latent_shape(pipe):
    with pytest.raises(ValueError, match=r"latents must be \(N, 2, 32\)"):
        pipe.decode(torch.zeros(2, 32), progress=False)


def test_configuration_errors_say_what_to_do(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="multiple of latent_tokens"):
        ModelConfig.from_preset("tiny", latent_tokens=3)  # tiny's n_prefix is 2
    with pytest.raises(ValueError, match="decoder_noise needs latent_tokens = 1"):
        train(TINY_TEXTS, tmp_path / "a", ModelConfig.from_preset("tiny", latent_tokens=K),
              tiny_train_config(decoder_noise=0.1), progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="reuse its reverse transformer only together with that decoder"):
        train(TINY_TEXTS, tmp_path / "b", ModelConfig.from_preset("tiny"),
              tiny_train_config(reverse_from=str(checkpoint)), progress=False, log=lambda *_: None)


def test_reused_decoder_brings_its_resampler(checkpoint, tmp_path):
    train(TINY_TEXTS, tmp_path / "m", ModelConfig.from_preset("tiny"),
          TrainConfig(**{**dataclasses.asdict(tiny_train_config()), "decoder_from": str(checkpoint)}),
          progress=False, log=lambda *_: None)
    reused, source = load_checkpoint(tmp_path / "m"), load_checkpoint(checkpoint)
    assert reused.config.latent_tokens == K
    assert torch.equal(reused.encoder.resampler.queries, source.encoder.resampler.queries)


def test_onnx_export_runs_latent_tokens_like_the_reference(checkpoint, pipe, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test extra")
    from ldlm.export.onnx_export import export_checkpoint

    export_checkpoint(checkpoint, tmp_path / "export", variants=("float32",), int8=False, log=lambda *_: None)
    onnx = ldlm.load(tmp_path / "export")
    texts = TINY_TEXTS[:3] + ["a much longer sentence than the others"]
    assert rel_err(onnx.encode(texts), pipe.encode(texts)) < 1e-5
    kwargs = {"sampler": "ddim", "steps": 10, "seed": 1, "progress": False}
    expected = pipe.sample_latents(3, **kwargs)
    assert rel_err(onnx.sample_latents(3, **kwargs), expected) < 1e-5
    assert onnx.decode(expected * 3, progress=False) == pipe.decode(expected * 3, progress=False)


def test_tiny_encoder_has_no_resampler_by_default():
    assert build_tiny_encoder().latent_shape == (32,)


def test_stage_1_cannot_grow_once_stage_2_trained_on_its_latents(tmp_path):
    config = ModelConfig.from_preset("tiny", latent_tokens=K)
    train(TINY_TEXTS, tmp_path / "m", config, tiny_train_config(decoder_steps=10, diffusion_steps=5),
          progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="extend only the diffusion stage"):
        train(TINY_TEXTS, tmp_path / "m", config, tiny_train_config(decoder_steps=20, diffusion_steps=10),
              resume=True, progress=False, log=lambda *_: None)
    summary = train(TINY_TEXTS, tmp_path / "m", config, tiny_train_config(decoder_steps=10, diffusion_steps=10),
                    resume=True, progress=False, log=lambda *_: None)
    assert summary["diffusion"]["steps"] == 10


def test_default_diffusion_batch_holds_the_designs_256_latent_vectors(tmp_path):
    quiet = dict(progress=False, log=lambda *_: None)
    for k, expected in ((1, 256), (K, 256 // K)):
        trainer = Trainer(TINY_TEXTS, tmp_path / f"k{k}", ModelConfig.from_preset("tiny", latent_tokens=k),
                          tiny_train_config(diffusion_batch_size=None), **quiet)
        assert trainer.diffusion_batch_size == expected
    trainer = Trainer(TINY_TEXTS, tmp_path / "given", ModelConfig.from_preset("tiny", latent_tokens=K),
                      tiny_train_config(diffusion_batch_size=32), **quiet)
    assert trainer.diffusion_batch_size == 32


def test_self_conditioning_with_latent_tokens_trains_and_samples_like_the_reference(tmp_path):
    config = ModelConfig.from_preset("tiny", latent_tokens=K, self_condition=True)
    train(TINY_TEXTS, tmp_path / "m", config, tiny_train_config(decoder_steps=10, diffusion_steps=6),
          progress=False, log=lambda *_: None)
    reference, fused = ldlm.load(tmp_path / "m"), ldlm.load(tmp_path / "m", backend="fused")
    kwargs = {"sampler": "ddim", "steps": 6, "seed": 3, "progress": False}
    expected = reference.sample_latents(2, **kwargs)
    assert expected.shape == (2, K, 32) and torch.isfinite(expected).all()
    assert rel_err(fused.sample_latents(2, **kwargs), expected) < 1e-5
