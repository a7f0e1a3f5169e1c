"""Shared fixtures: a tiny model built in code and briefly trained, so tests need no files or downloads."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # run Triton kernels in its interpreter; must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ldlm  # noqa: E402
from ldlm.config import ModelConfig
from ldlm.train import TrainConfig, train  # noqa: E402

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


@pytest.fixture()
def tiny_pipeline(tiny_checkpoint):
    torch.manual_seed(0)
    return ldlm.load(tiny_checkpoint)
