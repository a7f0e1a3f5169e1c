"""The Python API: generate, reconstruct, vary; seeds, input order, bad input, training resume."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import ldlm
from ldlm.model.checkpoint import load_checkpoint
from ldlm.model.config import ModelConfig
from ldlm.training.train import train

from .conftest import TINY_TEXTS, tiny_train_config


def test_training_lowers_held_out_losses(tiny_checkpoint):
    log = [json.loads(line) for line in (tiny_checkpoint / "training" / "log.jsonl").read_text().splitlines()]
    for stage in ("decoder", "diffusion"):
        losses = [r["val_loss"] for r in log if r["stage"] == stage]
        assert losses[-1] < losses[0], f"{stage} held-out loss did not fall: {losses}"


def test_generate_is_seeded_and_reproducible(tiny_pipeline):
    a = tiny_pipeline.sample_latents(3, sampler="ddim", steps=20, eta=1.0, seed=7, progress=False)
    b = tiny_pipeline.sample_latents(3, sampler="ddim", steps=20, eta=1.0, seed=7, progress=False)
    c = tiny_pipeline.sample_latents(3, sampler="ddim", steps=20, eta=1.0, seed=8, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    texts = tiny_pipeline.generate(3, sampler="ddpm", seed=1, progress=False)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert texts == tiny_pipeline.generate(3, sampler="ddpm", seed=1, progress=False)


def test_temperature_scales_the_starting_noise_and_nothing_else(tiny_pipeline, monkeypatch):
    import ldlm.pipeline

    starts = []

    def recording(sampler):
        def run(denoiser, x, schedule, **kwargs):
            starts.append(x.clone())
            return sampler(denoiser, x, schedule, **kwargs)

        return run

    monkeypatch.setattr(ldlm.pipeline, "SAMPLERS", {k: recording(v) for k, v in ldlm.pipeline.SAMPLERS.items()})
    kwargs = dict(sampler="ddim", steps=10, eta=1.0, seeds=[3, 4], progress=False)
    plain = tiny_pipeline.sample_latents(2, **kwargs)
    assert torch.equal(tiny_pipeline.sample_latents(2, temperature=1.0, **kwargs), plain)  # 1 is the default
    cooled = tiny_pipeline.sample_latents(2, temperature=0.25, **kwargs)
    assert torch.equal(starts[2], starts[0] * 0.25) and not torch.allclose(cooled, plain)
    # at 0 the deterministic sampler starts every seed from the same point: one text
    mode = tiny_pipeline.sample_latents(2, sampler="dpm++2m", steps=10, seeds=[3, 4], temperature=0.0,
                                        progress=False)
    assert torch.equal(mode[0], mode[1])
    for bad in (-0.1, 2.5, float("nan"), "1"):
        with pytest.raises(ValueError, match=r"temperature must be a number in \[0, 2\]"):
            tiny_pipeline.generate(1, temperature=bad, progress=False)


def test_sampled_latents_live_in_latent_space(tiny_pipeline):
    """Denormalized samples should have roughly the data's per-dimension scale, not the unit Gaussian's."""
    z = tiny_pipeline.sample_latents(64, sampler="ddim", steps=10, seed=0, progress=False)
    assert z.shape == (64, tiny_pipeline.config.latent_dim)
    assert torch.isfinite(z).all()


def test_results_come_in_input_order(tiny_pipeline):
    texts = ["the cat sat on the mat.", "he plays the old piano.", "rain fell on the quiet town."]
    together = tiny_pipeline.reconstruct(texts, progress=False)
    assert together == [tiny_pipeline.reconstruct([t], progress=False)[0] for t in texts]


def test_decode_batches_match_one_big_batch(tiny_pipeline):
    latents = tiny_pipeline.encode(TINY_TEXTS[:5])
    assert tiny_pipeline.decode(latents, batch_size=2, progress=False) == tiny_pipeline.decode(latents, progress=False)


def test_vary_strength_zero_is_reconstruction(tiny_pipeline):
    texts = ["we ate pizza at noon.", "the sun sets behind the hills."]
    assert tiny_pipeline.vary(texts, 0.0, progress=False) == tiny_pipeline.reconstruct(texts, progress=False)
    assert len(tiny_pipeline.vary(texts, 0.5, sampler="ddim", steps=10, progress=False)) == 2


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "high"])
def test_vary_rejects_bad_strength(tiny_pipeline, strength):
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        tiny_pipeline.vary(["a text"], strength)


def test_empty_inputs(tiny_pipeline):
    assert tiny_pipeline.reconstruct([], progress=False) == []
    assert tiny_pipeline.vary([], 0.3, progress=False) == []
    assert tiny_pipeline.generate(0, progress=False) == []


def test_empty_string_names_the_item(tiny_pipeline):
    with pytest.raises(ValueError, match="text 1 is empty"):
        tiny_pipeline.reconstruct(["fine", ""])


def test_nan_latent_is_refused_naming_the_item(tiny_pipeline):
    latents = tiny_pipeline.encode(["a", "b", "c"])
    latents[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"items \[2\] hold NaN"):
        tiny_pipeline.decode(latents)


def test_nan_in_the_model_names_the_sampling_step(tiny_pipeline):
    tiny_pipeline.reverse.out_proj.bias.data[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite latent at sampling step 0 \(t=999\)"):
        tiny_pipeline.generate(2, sampler="ddim", steps=5, progress=False)


def test_unknown_sampler(tiny_pipeline):
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        tiny_pipeline.generate(1, sampler="euler", progress=False)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sampler": "dpm++2m", "eta": 0.5}, r"eta \(DDIM's noise scale\) applies to sampler 'ddim' only"),
    ({"sampler": "ddpm", "eta": 1.0}, "applies to sampler 'ddim' only"),
    ({"sampler": "ddim", "eta": 1.5}, r"eta must be in \[0, 1\]"),
    ({"sampler": "dpm++2m", "steps": 0}, "steps must be between 1 and 1000 for sampler 'dpm\\+\\+2m', got 0"),
    ({"sampler": "ddim", "steps": 1001}, "steps must be between 1 and 1000"),
])
def test_sampling_arguments_that_cannot_run_fail_before_any_work(tiny_pipeline, kwargs, message):
    calls = []
    hook = tiny_pipeline.reverse.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            tiny_pipeline.sample_latents(2, progress=False, **kwargs)
        with pytest.raises(ValueError, match=message):
            tiny_pipeline.vary_latents(["the cat sat."], 0.5, progress=False, **kwargs)
    finally:
        hook.remove()
    assert not calls


def test_resume_continues_where_training_stopped(tmp_path):
    config = ModelConfig.from_preset("tiny")
    out = tmp_path / "run"
    quiet = dict(progress=False, log=lambda *_: None)
    train(TINY_TEXTS, out, config, tiny_train_config(decoder_steps=20, diffusion_steps=10), **quiet)
    state = json.loads((out / "training" / "state.json").read_text())
    assert state["steps"] == {"decoder": 20, "diffusion": 10} and state["stage"] == "done"
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(TINY_TEXTS, out, config, tiny_train_config(), **quiet)
    summary = train(TINY_TEXTS, out, config, tiny_train_config(decoder_steps=30, diffusion_steps=25), resume=True, **quiet)
    assert summary["decoder"]["steps"] == 30 and summary["diffusion"]["steps"] == 25
    assert ldlm.load(out).generate(1, sampler="ddim", steps=3, progress=False)
    with pytest.raises(ValueError, match="other data"):
        train(TINY_TEXTS[:8], out, config, tiny_train_config(), resume=True, **quiet)


def test_pretrained_decoder_path_brings_its_tokenizer(tmp_path):
    """A user-supplied GPT-2 (saved with save_pretrained) is fine-tuned with its own tokenizer and config."""
    from transformers import GPT2LMHeadModel

    from ldlm.model.decoder import gpt2_config, train_bpe_tokenizer

    config = ModelConfig.from_preset("tiny")
    tokenizer = train_bpe_tokenizer(["some other corpus entirely, for a pretrained tokenizer"] * 4, 280)
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(dataclasses.replace(config, n_embd=48, n_head=4), tokenizer)).save_pretrained(
        tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "run"
    train(TINY_TEXTS, out, dataclasses.replace(config, decoder=str(tmp_path / "gpt2")),
          tiny_train_config(decoder_steps=5, diffusion_steps=5), progress=False, log=lambda *_: None)
    pipe = ldlm.load(out)
    assert pipe.decoder.gpt2.config.n_embd == 48 and len(pipe.decoder.tokenizer) == len(tokenizer)
    assert len(pipe.reconstruct(["the cat sat."], progress=False)) == 1


def test_decoder_noise_changes_training_but_not_validation(tmp_path):
    """The noised-latent lever perturbs stage 1's training batches only; held-out loss stays on clean latents."""
    config = ModelConfig.from_preset("tiny")
    quiet = dict(progress=False, log=lambda *_: None)
    clean = train(TINY_TEXTS, tmp_path / "clean", config, tiny_train_config(decoder_steps=20, diffusion_steps=1), **quiet)
    noised = train(TINY_TEXTS, tmp_path / "noised", config,
                   tiny_train_config(decoder_steps=20, diffusion_steps=1, decoder_noise=0.5), **quiet)
    assert noised["decoder"]["train_loss"] != clean["decoder"]["train_loss"]
    assert noised["decoder"]["val_loss"] is not None and clean["decoder"]["val_loss"] is not None


def test_ema_weights_are_served_and_resume_continues_from_raw_weights(tmp_path):
    from safetensors.torch import load_file

    config = ModelConfig.from_preset("tiny")
    quiet = dict(progress=False, log=lambda *_: None)
    out = tmp_path / "ema"
    train(TINY_TEXTS, out, config, tiny_train_config(decoder_steps=2, diffusion_steps=15, ema_decay=0.9), **quiet)
    served, raw = load_file(str(out / "reverse.safetensors")), load_file(str(out / "training" / "reverse_raw.safetensors"))
    assert served.keys() == raw.keys() and any(not torch.equal(served[k], raw[k]) for k in served)
    summary = train(TINY_TEXTS, out, config, tiny_train_config(decoder_steps=2, diffusion_steps=25, ema_decay=0.9),
                    resume=True, **quiet)
    assert summary["diffusion"]["steps"] == 25
    assert not torch.equal(load_file(str(out / "reverse.safetensors"))["out_proj.weight"], served["out_proj.weight"])


def test_self_conditioning_trains_and_samples(tmp_path):
    config = dataclasses.replace(ModelConfig.from_preset("tiny"), self_condition=True)
    out = tmp_path / "sc"
    train(TINY_TEXTS, out, config, tiny_train_config(decoder_steps=2, diffusion_steps=10), progress=False,
          log=lambda *_: None)
    pipe = ldlm.load(out)
    assert pipe.config.self_condition and pipe.reverse.in_proj.in_features == 2 * 32 + config.time_embed_dim
    a = pipe.sample_latents(2, sampler="ddim", steps=5, seed=1, progress=False)
    assert torch.equal(a, pipe.sample_latents(2, sampler="ddim", steps=5, seed=1, progress=False))


def test_reusing_a_trained_part_skips_its_stage_and_keeps_it_exactly(tiny_checkpoint, tmp_path):
    """--decoder-from / --reverse-from: measure a change to one part against the same other part."""
    from safetensors.torch import load_file

    quiet = dict(progress=False, log=lambda *_: None)
    config = dataclasses.replace(ModelConfig.from_preset("tiny"), self_condition=True, n_embd=48)
    out = tmp_path / "new_reverse"
    summary = train(TINY_TEXTS, out, config,
                    tiny_train_config(decoder_steps=None, diffusion_steps=5, decoder_from=str(tiny_checkpoint)), **quiet)
    assert summary["decoder"] == {"reused_from": str(tiny_checkpoint)} and summary["diffusion"]["steps"] == 5
    pipe = ldlm.load(out)
    assert pipe.config.self_condition and pipe.config.n_embd == 32  # the reused decoder's fields win
    for name in ("decoder.safetensors", "latent_stats.safetensors"):  # same data: the same statistics
        ours, theirs = load_file(str(out / name)), load_file(str(tiny_checkpoint / name))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    out = tmp_path / "new_decoder"
    summary = train(TINY_TEXTS, out, ModelConfig.from_preset("tiny"),
                    tiny_train_config(decoder_steps=4, diffusion_steps=None, reverse_from=str(tiny_checkpoint)), **quiet)
    assert summary["diffusion"] == {"reused_from": str(tiny_checkpoint)} and summary["decoder"]["steps"] == 4
    ours, theirs = load_file(str(out / "reverse.safetensors")), load_file(str(tiny_checkpoint / "reverse.safetensors"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert ldlm.load(out).generate(1, sampler="ddim", steps=3, progress=False)

    out = tmp_path / "combined"  # both parts reused: a new checkpoint assembled without training
    summary = train(TINY_TEXTS, out, ModelConfig.from_preset("tiny"),
                    tiny_train_config(decoder_steps=None, diffusion_steps=None, decoder_from=str(tmp_path / "new_decoder"),
                                      reverse_from=str(tmp_path / "new_reverse")), **quiet)
    assert set(summary["decoder"]) == set(summary["diffusion"]) == {"reused_from"}
    assert ldlm.load(out).config.self_condition and ldlm.load(out).generate(1, sampler="ddim", steps=3, progress=False)

    with pytest.raises(ValueError, match="step limits for each stage"):
        tiny_train_config(decoder_steps=None, diffusion_steps=5)


def test_checkpoint_sampling_defaults_apply_unless_overridden(tiny_checkpoint):
    """Preset `small` samples with DPM-Solver++(2M), 20 steps, by default (as well as DDIM 50 in bench/RESULTS.md);
    `small-designed` with DDPM 1000."""
    small = ModelConfig.from_preset("small")
    assert (small.sampler, small.sampling_steps) == ("dpm++2m", 20)
    assert ModelConfig.from_preset("small-designed").sampler == "ddpm"
    components = load_checkpoint(tiny_checkpoint)
    components.config = dataclasses.replace(components.config, sampler="ddim", sampling_steps=7)
    pipe = ldlm.Pipeline(components)
    assert pipe.sampling(None, None) == ("ddim", 7) and pipe.sampling("ddpm", None) == ("ddpm", None)
    default = pipe.sample_latents(2, seed=1, progress=False)
    assert torch.equal(default, pipe.sample_latents(2, sampler="ddim", steps=7, seed=1, progress=False))
    with pytest.raises(ValueError, match=r"sampler must be one of \['ddpm', 'ddim', 'dpm\+\+2m'\]"):
        ModelConfig(sampler="euler")
    # small: four latent tokens decoded by beam search (issue 4's measurement); small-designed: the mean-pooled latent
    assert ModelConfig.from_preset("small").latent_tokens == 4 and ModelConfig.from_preset("small").decoding == "beam"
    assert ModelConfig.from_preset("small-designed").latent_tokens == 1
    components.config = dataclasses.replace(components.config, decoding="nucleus", top_p=0.8)
    pipe = ldlm.Pipeline(components)
    latents = pipe.sample_latents(3, seed=2, progress=False)
    assert pipe.generate(3, seed=2, progress=False) == pipe.decode(latents, top_p=0.8, seed=2, progress=False)
    assert pipe.generate(3, seed=2, decoding="beam", progress=False) == pipe.decode(latents, progress=False)
    with pytest.raises(ValueError, match="decoding must be 'beam' or 'nucleus'"):
        pipe.generate(1, decoding="greedy", progress=False)


def test_nucleus_decode_is_seeded_and_runs_on_both_decoders(tiny_pipeline):
    """top_p decodes by nucleus sampling: the same seed gives the same texts; top_p -> 0 is greedy decoding."""
    from ldlm.sampling.nucleus import nucleus_decode

    latents = tiny_pipeline.sample_latents(4, sampler="ddim", steps=3, seed=0, progress=False) * 3
    a = tiny_pipeline.decode(latents, top_p=0.9, seed=1, progress=False)
    assert a == tiny_pipeline.decode(latents, top_p=0.9, seed=1, progress=False) and len(a) == 4
    greedy = nucleus_decode(tiny_pipeline.decoder, latents, top_p=1e-9, max_new_tokens=8)
    from ldlm.sampling.beam_search import BeamSearchConfig, beam_search

    assert greedy == beam_search(tiny_pipeline.decoder, latents, BeamSearchConfig(num_beams=1, max_new_tokens=8,
                                                                                  no_repeat_ngram_size=0))
    with pytest.raises(ValueError, match="top_p must be in"):
        nucleus_decode(tiny_pipeline.decoder, latents, top_p=0.0)


@pytest.mark.parametrize("decoding", ["beam", "nucleus"])
def test_generate_batches_gives_generates_texts_a_batch_at_a_time(tiny_pipeline, decoding):
    """What generate(n) was (sample_latents, then decode of everything with the same seed), a batch at a time:
    the same texts in the same order, one batch held (issue 37: `ldlm generate -n` prints as it goes)."""
    kwargs = {"sampler": "ddim", "steps": 3, "seed": 5, "progress": False}
    latents = tiny_pipeline.sample_latents(130, batch_size=128, **kwargs) * 3  # scaled: varied decodes
    top_p = 0.9 if decoding == "nucleus" else None
    expected = tiny_pipeline.decode(latents, top_p=top_p, seed=5, progress=False)
    original = tiny_pipeline.denormalize
    tiny_pipeline.denormalize = lambda z: original(z) * 3  # the same scaling inside generate
    try:
        batches = list(tiny_pipeline.generate_batches(130, batch_size=128, decoding=decoding, top_p=top_p, **kwargs))
        whole = tiny_pipeline.generate(130, batch_size=128, decoding=decoding, top_p=top_p, **kwargs)
    finally:
        tiny_pipeline.denormalize = original
    assert [len(b) for b in batches] == [128, 2]
    assert [t for b in batches for t in b] == whole == expected
    if decoding == "nucleus":  # the draws vary, so a draw taken out of turn would show
        assert len(set(expected)) > 3
