"""Hostile model folders (issue 17): no code runs from a checkpoint or an export, nothing outside the folder is
read, a config that does not belong to its weights stops before any module is built, and every file an export's
loader opens is listed and verified. Each case is built in a temp dir as an attacker (or a careless user) would."""

from __future__ import annotations

import builtins
import json
import os
import shutil

import pytest
import torch

import ldlm
from ldlm.cli import main
from ldlm.export.manifest import ExportError, hash_files, read_manifest
from ldlm.export.onnx_export import export_checkpoint
from ldlm.model.checkpoint import CheckpointError, load_checkpoint
from ldlm.model.encoder import build_tiny_encoder
from ldlm.model.model_files import ModelFileError

# what a hostile folder ships beside a config naming it (`auto_map`): it leaves a mark if it ever runs
PAYLOAD = "import pathlib\npathlib.Path({mark!r}).write_text('ran')\n"


@pytest.fixture()
def checkpoint(tiny_checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    return target


@pytest.fixture(scope="module")
def clean_export(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    export_checkpoint(tiny_checkpoint, out, variants=("float32",), int8=False, log=lambda *_: None)
    return out


@pytest.fixture()
def export(clean_export, tmp_path):
    target = tmp_path / "export"
    shutil.copytree(clean_export, target)
    return target


@pytest.fixture()
def answer_yes(monkeypatch):
    """Answer yes to any prompt (as `yes | ldlm ...` does), and record that one was asked."""
    asked = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": asked.append(prompt) or "y")
    return asked


def edit_json(path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def plant_custom_code(folder, config_name: str, mark) -> None:
    """An `auto_map` naming a Python file in the folder, as a model with custom code has, and no architecture
    or class transformers knows, so that transformers itself would ask to run the file."""
    (folder / "evil.py").write_text(PAYLOAD.format(mark=str(mark)))
    if config_name == "config.json":
        evil = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.Evil"}
        edit_json(folder / config_name, lambda c: c.update(model_type="evil", auto_map=evil))
    else:
        edit_json(folder / config_name, lambda c: (c.pop("tokenizer_class", None),
                                                   c.update(auto_map={"AutoTokenizer": ["evil.Evil", None]})))


def sign(export) -> None:
    """Rewrite the manifest's hashes, as whoever wrote the files can."""
    edit_json(export / "manifest.json", lambda m: m.update(files=hash_files(export)))


def test_tiny_encoder_reads_words_so_different_texts_get_different_latents():
    encoder = build_tiny_encoder(32)
    ids = encoder.tokenizer("The cat walked home.")["input_ids"]
    assert encoder.tokenizer.unk_token_id not in ids and len(encoder.tokenizer) > 100
    latents = encoder.encode(["The cat walked home.", "zzzz qqqq xxxxx yyyy.", "The cat walked home."])
    assert (latents[0] - latents[1]).abs().max() > 1e-3
    torch.testing.assert_close(latents[0], latents[2], rtol=0, atol=0)


@pytest.mark.parametrize("where", ["encoder/config.json", "encoder/tokenizer_config.json",
                                   "tokenizer/tokenizer_config.json"])
def test_custom_code_in_a_checkpoint_never_runs(checkpoint, tmp_path, answer_yes, capsys, where):
    folder, name = where.split("/")
    mark = tmp_path / "ran"
    plant_custom_code(checkpoint / folder, name, mark)
    assert main(["info", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "custom code" in err and where in err and "auto_map" in err
    assert not mark.exists() and not answer_yes
    with pytest.raises(CheckpointError, match="never runs code"):
        ldlm.load(checkpoint)


def test_custom_code_in_an_export_tokenizer_never_runs(export, tmp_path, answer_yes, capsys):
    mark = tmp_path / "ran"
    plant_custom_code(export / "decoder_tokenizer", "tokenizer_config.json", mark)
    sign(export)  # the hashes do not help: whoever writes the files writes the hashes
    assert main(["generate", str(export), "-n", "1", "--sampler", "ddim", "--steps", "2", "--no-progress"]) == 2
    assert "custom code" in capsys.readouterr().err
    assert not mark.exists() and not answer_yes


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="llama"), "is a 'llama' model"),
    (lambda c: c.update(model_type=None), "is a None model"),
])
def test_only_known_encoder_architectures_load(checkpoint, edit, message):
    edit_json(checkpoint / "encoder" / "config.json", edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(checkpoint)


def test_only_transformers_own_tokenizer_classes_load(checkpoint):
    edit_json(checkpoint / "tokenizer" / "tokenizer_config.json", lambda c: c.update(tokenizer_class="EvilTokenizer"))
    with pytest.raises(CheckpointError, match="names tokenizer class 'EvilTokenizer'"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("section, field, value, message", [
    ("model", "d_model", 131072, "reverse.safetensors does not match config.json: shapes differ"),
    ("model", "n_layers", 100000, "asks for 100000 'blocks' blocks"),
    ("gpt2", "n_layer", 100000, "asks for 100000 'gpt2.transformer.h' blocks"),
    ("gpt2", "n_positions", 10**9, "decoder.safetensors does not match config.json: shapes differ"),
    ("gpt2", "vocab_size", 10**9, "decoder.safetensors does not match config.json: shapes differ"),
    ("model", "num_timesteps", 10**10, "num_timesteps must be at most"),
    ("model", "d_model", "768", "d_model must be a whole number"),
])
def test_hostile_sizes_stop_before_any_module_is_built(checkpoint, monkeypatch, section, field, value, message):
    """Checked against the safetensors headers on the meta device: the real modules are never built (building
    them is what allocated 206 GB for d_model 131072, and ran for minutes for 100000 layers)."""
    edit_json(checkpoint / "config.json", lambda m: m[section].update({field: value}))
    built = []
    real_init = torch.nn.Linear.reset_parameters
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters",
                        lambda self: built.append(self.weight.device.type) or real_init(self))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(checkpoint)
    assert "cpu" not in built


def test_hostile_bundled_encoder_size_stops_before_loading(checkpoint):
    edit_json(checkpoint / "encoder" / "config.json", lambda c: c.update(hidden_size=131072, intermediate_size=8))
    with pytest.raises(CheckpointError, match="model.safetensors does not match"):
        load_checkpoint(checkpoint)
    edit_json(checkpoint / "encoder" / "config.json", lambda c: c.update(hidden_size=32, num_hidden_layers=100000))
    with pytest.raises(CheckpointError, match="asks for 100000 'encoder.layer' blocks"):
        load_checkpoint(checkpoint)


def test_pickled_weights_are_refused(checkpoint):
    (checkpoint / "encoder" / "model.safetensors").rename(checkpoint / "encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors weights only"):
        load_checkpoint(checkpoint)


def test_a_checkpoint_reads_nothing_outside_its_folder(checkpoint, tmp_path):
    edit_json(checkpoint / "config.json", lambda m: m.pop("encoder"))
    with pytest.raises(CheckpointError, match="no \"encoder\" entry"):  # it used to ask the model hub
        load_checkpoint(checkpoint)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(checkpoint / "encoder", elsewhere)
    edit_json(checkpoint / "config.json",
              lambda m: (m.update(encoder={"bundled": False}), m["model"].update(encoder=str(elsewhere))))
    with pytest.raises(CheckpointError, match="not a hub id and not in the checkpoint"):
        load_checkpoint(checkpoint)
    edit_json(checkpoint / "config.json", lambda m: m["model"].update(encoder="nobody/no-such-encoder"))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_checkpoint(checkpoint)


def test_symlinks_out_of_a_checkpoint_are_refused(checkpoint, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(checkpoint / "reverse.safetensors", outside)
    os.symlink(outside, checkpoint / "reverse.safetensors")
    with pytest.raises(CheckpointError, match="outside"):
        load_checkpoint(checkpoint)
    os.remove(checkpoint / "reverse.safetensors")
    os.symlink("/proc/self/pagemap", checkpoint / "reverse.safetensors")
    with pytest.raises(CheckpointError, match="outside"):
        load_checkpoint(checkpoint)


def test_training_bundles_an_encoder_given_as_a_folder(tiny_checkpoint, tmp_path):
    """A checkpoint reads only its folder, so an encoder named by a local path travels inside it."""
    from ldlm.model.config import ModelConfig
    from ldlm.training.train import train

    from .conftest import TINY_TEXTS, tiny_train_config

    folder = tmp_path / "my-encoder"
    shutil.copytree(tiny_checkpoint / "encoder", folder)
    out = tmp_path / "model"
    config = ModelConfig.from_preset("tiny", encoder=str(folder))
    train(TINY_TEXTS, out, config, tiny_train_config(decoder_steps=2, diffusion_steps=2), progress=False,
          log=lambda *_: None)
    shutil.rmtree(folder)
    pipe = ldlm.load(out)
    assert json.loads((out / "config.json").read_text())["encoder"]["bundled"] is True
    assert pipe.encode(["the cat sat."]).shape == (1, 32)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"].update({"../secret": "0" * 64}), "outside"),
    (lambda m: m["files"].update({"/proc/self/pagemap": "0" * 64}), "outside"),
    (lambda m: m["graphs"]["float32"]["reverse"].update(file="../../etc/passwd"), "outside"),
    (lambda m: m["graphs"]["float32"]["reverse"].update(file="/proc/self/pagemap"), "outside"),
    (lambda m: m["tokenizers"].update(decoder="/etc"), "outside"),
    (lambda m: m["files"].pop("reverse.onnx.data"), "reverse.onnx.data is not listed"),
    (lambda m: m.update(files={}), "is not listed"),
])
def test_an_export_reads_only_its_own_listed_files(export, capsys, edit, message):
    edit_json(export / "manifest.json", edit)
    with pytest.raises(ExportError, match=message):
        read_manifest(export)
    with pytest.raises(ExportError, match=message):
        ldlm.load(export)
    assert main(["info", str(export)]) == 2 and message.split()[-1] in capsys.readouterr().err


def test_an_unlisted_corrupted_external_data_file_is_caught(export):
    """A corrupted reverse.onnx.data with its entry removed used to load and give other latents."""
    data = export / "reverse.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[:16] = bytes(16)
    data.write_bytes(bytes(raw))
    edit_json(export / "manifest.json", lambda m: m["files"].pop("reverse.onnx.data"))
    with pytest.raises(ExportError, match="not listed"):
        ldlm.load(export)
    edit_json(export / "manifest.json", lambda m: m["files"].update({"reverse.onnx.data": "0" * 64}))
    with pytest.raises(ExportError, match="does not match its hash"):
        ldlm.load(export)


def test_symlinks_and_planted_files_in_an_export_are_refused(export, tmp_path):
    (tmp_path / "secret").write_text("secret")
    os.symlink(tmp_path / "secret", export / "extra")
    with pytest.raises(ExportError, match="outside"):
        read_manifest(export)
    os.remove(export / "extra")
    (export / "encoder_tokenizer" / "evil.py").write_text("raise SystemExit")
    with pytest.raises(ExportError, match="evil.py is not listed"):
        read_manifest(export)


def test_hostile_export_sizes_stop_before_allocating(export):
    edit_json(export / "manifest.json", lambda m: m["decoder"].update(vocab_size=10**12))
    sign(export)
    with pytest.raises(ValueError, match="manifest.json's decoder vocab_size implies"):
        ldlm.load(export)


def test_info_on_a_verified_export_says_so(export, capsys):
    assert main(["info", str(export)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["hashes"] == "verified" and info["files"] == len(read_manifest(export)["files"])


def test_export_never_overwrites_what_is_not_an_export(checkpoint, export, tmp_path, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    assert main(["export", str(checkpoint), str(checkpoint), "--no-fp16", "--no-int8"]) == 2
    assert "is not empty and is an ldlm checkpoint" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an ldlm export"):
        export_checkpoint(checkpoint, tmp_path / "notes", log=lambda *_: None)
    with pytest.raises(FileExistsError, match="already holds an export: pass --overwrite"):
        export_checkpoint(checkpoint, export, log=lambda *_: None)
    old = read_manifest(export)["versions"]
    export_checkpoint(checkpoint, export, variants=("float32",), int8=False, overwrite=True, log=lambda *_: None)
    assert read_manifest(export)["versions"] == old and not list(tmp_path.glob(".export.partial-*"))
