"""`ldlm demo`: trains once into the cache, then reuses it."""

from __future__ import annotations

from ldlm.demo import run_demo

from .conftest import TINY_TEXTS


def test_demo_trains_once_then_reuses_the_cache(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(TINY_TEXTS) + "\n")
    kwargs = dict(data=[str(data)], cache_dir=tmp_path / "cache", time_budget=2.0, num_samples=2, progress=False,
                  preset="tiny")
    first = run_demo(**kwargs)
    assert "model: training preset 'tiny'" in capsys.readouterr().out
    second = run_demo(**kwargs)
    out = capsys.readouterr().out
    assert "model: cached at" in out and "time per stage" in out
    assert second["checkpoint"] == first["checkpoint"]
    assert second["samples"] == first["samples"] and len(second["samples"]) == 2
    assert len(second["reconstructions"]) == len(second["variations"]) >= 1  # held-out sentences
