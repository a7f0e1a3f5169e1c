"""`ldlm demo`: fixed step counts, trains once into the cache and reuses it, reuses the encoded corpus across
step counts, and checks its own model before presenting it."""

from __future__ import annotations

import argparse

from ldlm.cli import build_parser
from ldlm.demo import DEMO_DECODER_STEPS, DEMO_DIFFUSION_STEPS, run_demo

from .conftest import TINY_TEXTS


def _demo(tmp_path, **overrides):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(TINY_TEXTS) + "\n")
    kwargs = dict(data=[str(data)], cache_dir=tmp_path / "cache", decoder_steps=3, diffusion_steps=2, num_samples=2,
                  progress=False, preset="tiny")
    return run_demo(**{**kwargs, **overrides})


def test_demo_trains_once_then_reuses_the_cache(tmp_path, capsys):
    first = _demo(tmp_path)
    assert "model: training preset 'tiny', 3 decoder and 2 diffusion steps" in capsys.readouterr().out
    second = _demo(tmp_path)
    out = capsys.readouterr().out
    assert "model: cached at" in out and "time per stage" in out
    assert second["checkpoint"] == first["checkpoint"]
    assert second["samples"] == first["samples"] and len(second["samples"]) == 2
    assert len(second["reconstructions"]) == len(second["variations"]) >= 1  # held-out sentences


def test_same_steps_give_the_same_model_and_other_steps_reuse_the_encoded_corpus(tmp_path, capsys):
    first = _demo(tmp_path)
    assert "encoded corpus: reused" not in capsys.readouterr().out
    other = _demo(tmp_path, decoder_steps=4)
    out = capsys.readouterr().out
    assert other["checkpoint"] != first["checkpoint"] and "encoded corpus: reused" in out
    again = _demo(tmp_path, cache_dir=tmp_path / "elsewhere")  # a fresh cache, the first run's steps: the same weights, the same texts
    assert again["samples"] == first["samples"] and again["reconstructions"] == first["reconstructions"]


def test_an_undertrained_demo_says_so_and_what_to_do(tmp_path, capsys):
    result = _demo(tmp_path)  # 3 + 2 steps of the tiny preset: far from trained
    out = capsys.readouterr().out
    assert not result["self_check"].passed
    assert "self-check FAILED, the model is undertrained" in out and "To fix: train longer" in out
    assert out.index("self-check FAILED") < out.index("unconditional samples:")  # said before the samples


def test_the_cli_defaults_are_the_demo_step_counts():
    demo = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["demo"]
    defaults = {a.dest: a.default for a in demo._actions}
    assert (defaults["decoder_steps"], defaults["diffusion_steps"]) == (DEMO_DECODER_STEPS, DEMO_DIFFUSION_STEPS)
