"""Checkpoints: a round trip gives the same model; corrupt or mismatched ones fail with a clear message."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ldlm
from ldlm.model.checkpoint import CheckpointError, load_checkpoint


@pytest.fixture()
def checkpoint_copy(tiny_checkpoint, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, target)
    return target


def test_round_trip_gives_identical_outputs(tiny_pipeline, tmp_path):
    saved = tiny_pipeline.save(tmp_path / "resaved")
    again = ldlm.load(saved)
    for name in ("reverse", "decoder", "encoder"):
        a, b = getattr(tiny_pipeline, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(again.latent_mean, tiny_pipeline.latent_mean)
    texts = ["the cat sat on the mat.", "rain fell."]
    assert again.reconstruct(texts, progress=False) == tiny_pipeline.reconstruct(texts, progress=False)
    torch.testing.assert_close(again.encode(texts), tiny_pipeline.encode(texts), rtol=0, atol=0)


def test_files_are_safetensors_and_json_only(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.rglob("*") if p.is_file()}
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for n in names)
    assert {"config.json", "reverse.safetensors", "decoder.safetensors", "latent_stats.safetensors"} <= names


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_checkpoint(tmp_path / "nope")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)


def test_corrupt_config(checkpoint_copy):
    (checkpoint_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON.*corrupt"):
        load_checkpoint(checkpoint_copy)


def test_corrupt_weights(checkpoint_copy):
    path = checkpoint_copy / "reverse.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="reverse.safetensors is not a readable safetensors file"):
        load_checkpoint(checkpoint_copy)


def test_missing_weights(checkpoint_copy):
    (checkpoint_copy / "decoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match="decoder.safetensors is missing"):
        load_checkpoint(checkpoint_copy)


def test_shape_mismatch_with_config(checkpoint_copy):
    meta = json.loads((checkpoint_copy / "config.json").read_text())
    meta["model"]["d_model"] = 128
    (checkpoint_copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="reverse.safetensors does not match config.json: shapes differ"):
        load_checkpoint(checkpoint_copy)


def test_newer_format_version(checkpoint_copy):
    meta = json.loads((checkpoint_copy / "config.json").read_text())
    meta["format_version"] = 99
    (checkpoint_copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99.*use the ldlm version that wrote it"):
        load_checkpoint(checkpoint_copy)


def test_unknown_config_field(checkpoint_copy):
    meta = json.loads((checkpoint_copy / "config.json").read_text())
    meta["model"]["warp_drive"] = True
    (checkpoint_copy / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown model config fields.*warp_drive"):
        load_checkpoint(checkpoint_copy)


def test_latent_stats_of_the_wrong_size(checkpoint_copy):
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(3), "std": torch.ones(3)}, str(checkpoint_copy / "latent_stats.safetensors"))
    with pytest.raises(CheckpointError, match=r"must hold mean and std of shape \(32,\)"):
        load_checkpoint(checkpoint_copy)


@pytest.mark.parametrize("bad", [float("nan"), 0.0, float("inf")])
def test_latent_stats_that_are_not_finite_or_not_positive_are_refused(checkpoint_copy, bad):
    from safetensors.torch import load_file, save_file

    path = checkpoint_copy / "latent_stats.safetensors"
    stats = load_file(str(path))
    stats["std"][3] = bad
    save_file(stats, str(path))
    with pytest.raises(CheckpointError, match=r"latent_stats.safetensors: the latent std is .* in dimension 3 .*"
                                              r"finite and above 0"):
        load_checkpoint(checkpoint_copy)


def test_a_tokenizer_that_does_not_fit_the_decoder_or_does_not_load_is_named(checkpoint_copy):
    from transformers import AutoTokenizer

    from ldlm.model.decoder import train_bpe_tokenizer
    from ldlm.model.model_files import ModelFileError

    folder = checkpoint_copy / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_tokens(["zzzextra1", "zzzextra2"])  # another model's vocabulary, two tokens longer
    tokenizer.save_pretrained(str(folder))
    with pytest.raises(ModelFileError, match=r"tokenizer holds a tokenizer of 302 tokens, more than the 300 of the "
                                             r"network it feeds: it belongs to another model"):
        load_checkpoint(checkpoint_copy)
    shutil.rmtree(folder)
    train_bpe_tokenizer(["a much smaller vocabulary"], 50).save_pretrained(str(folder))  # another model's
    with pytest.raises(ModelFileError, match=r"tokenizer holds a tokenizer of \d+ tokens, but the one saved with "
                                             r"this model had 300: it belongs to another model"):
        load_checkpoint(checkpoint_copy)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFileError, match=r"tokenizer does not load as a tokenizer .*tokenizer.json is missing "
                                             "or corrupt"):
        load_checkpoint(checkpoint_copy)
