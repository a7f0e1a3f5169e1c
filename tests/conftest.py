"""Shared fixtures: a tiny model built in code and briefly trained, so tests need no files or downloads."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # run Triton kernels in its interpreter; must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ldlm  # noqa: E402
from ldlm.model.config import ModelConfig
from ldlm.training.train import TrainConfig, train  # noqa: E402

TINY_TEXTS = [
    "the cat sat on the mat.",
    "a dog ran in the park.",
    "the bird flew over the house.",
    "we ate pizza at noon.",
    "she reads a book every night.",
    "the sun sets behind the hills.",
    "he plays the old piano.",
    "rain fell on the quiet town.",
] * 8


def tiny_train_config(**overrides) -> TrainConfig:
    values = dict(time_budget=None, decoder_steps=60, diffusion_steps=40, eval_every=20,
                  decoder_batch_size=16, diffusion_batch_size=32, warmup_steps=10, save_every=1e9)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "model"
    train(TINY_TEXTS, out, ModelConfig.from_preset("tiny"), tiny_train_config(), progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def varied_decoder():
    """A random tiny decoder whose EOS logit is raised, so beam hypotheses end at varied lengths."""
    from ldlm.model.decoder import LatentDecoder

    torch.manual_seed(0)
    decoder = LatentDecoder.build(ModelConfig.from_preset("tiny"), TINY_TEXTS).eval()
    for p in decoder.parameters():
        p.data.normal_(0, 0.5)

    def raise_eos(module, inputs, logits):
        logits = logits.clone()
        logits[..., decoder.eos_token_id] += 6.0
        return logits

    decoder.gpt2.lm_head.register_forward_hook(raise_eos)
    return decoder


@pytest.fixture()
def tiny_pipeline(tiny_checkpoint):
    torch.manual_seed(0)
    return ldlm.load(tiny_checkpoint)


def assert_threads_get_their_own_results(pipe, workers: int = 3, calls: int = 6) -> None:
    """Threads sharing `pipe` (a web server's workers, say) get what each call alone gives: sampling with noise,
    encoding and beam decoding, several calls at once."""
    from concurrent.futures import ThreadPoolExecutor

    texts = TINY_TEXTS[:3]

    def work(seed):
        latents = pipe.sample_latents(3, sampler="ddim", steps=12, eta=1.0, seed=seed, progress=False)
        encoded = pipe.encode(texts[seed % 3 :])
        return latents, pipe.decode(latents * 3, progress=False), encoded, pipe.decode(encoded, progress=False)

    alone = [work(seed) for seed in range(calls)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        together = list(pool.map(work, range(calls)))
    for got, expected in zip(together, alone):
        torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)  # the same kernels: equal in practice
        assert got[1] == expected[1]
        torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=1e-6)
        assert got[3] == expected[3]
