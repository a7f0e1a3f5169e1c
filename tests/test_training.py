"""Training as a user relies on it: reproducible from its seed, resumable to the same weights, on any device
and in bf16 autocast. The CUDA cases run where a GPU is (bench/gpu_check.sh) and are skipped elsewhere."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import ldlm
from ldlm.cli import main
from ldlm.model.config import ModelConfig
from ldlm.training.out_folder import training_lock
from ldlm.training.train import STAGES, Trainer, train

from .conftest import TINY_TEXTS, tiny_train_config

QUIET = dict(progress=False, log=lambda *_: None)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
# the design's model with every source of randomness training has: dropout (GPT-2), self-conditioning's coin, EMA
SELF_CONDITIONED = dataclasses.replace(ModelConfig.from_preset("tiny"), self_condition=True)


def weights(directory) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint serves, and the raw reverse weights an EMA run keeps for --resume."""
    files = sorted(directory.glob("*.safetensors")) + sorted((directory / "training").glob("reverse_raw.safetensors"))
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def assert_same_weights(a: dict, b: dict, device: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if device == "cpu":  # the CPU kernels are deterministic: bit for bit
            assert torch.equal(a[key], b[key]), key
        else:  # CUDA's embedding backward accumulates with atomics, in no fixed order
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_weights_and_the_callers_random_state_untouched(tmp_path, device):
    config = tiny_train_config(decoder_steps=8, diffusion_steps=6, ema_decay=0.9, device=device)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    train(TINY_TEXTS, tmp_path / "a", SELF_CONDITIONED, config, **QUIET)
    assert torch.equal(torch.get_rng_state(), before), "training changed the caller's global random state"
    torch.manual_seed(456)  # a different global state must not matter: dropout is seeded from the config
    train(TINY_TEXTS, tmp_path / "b", SELF_CONDITIONED, config, **QUIET)
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"), device)
    train(TINY_TEXTS, tmp_path / "c", SELF_CONDITIONED, dataclasses.replace(config, seed=1), **QUIET)
    assert not torch.equal(weights(tmp_path / "a")["decoder.safetensors:gpt2.lm_head.weight"],
                           weights(tmp_path / "c")["decoder.safetensors:gpt2.lm_head.weight"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stop_stage, stop_step", [("decoder", 5), ("diffusion", 3)])
def test_interrupted_run_resumed_equals_an_uninterrupted_one(tmp_path, monkeypatch, device, stop_stage, stop_step):
    """A run stopped mid-stage (a crash after a save, or a spent time budget) and resumed ends with the weights
    of a run never stopped: batches, timesteps, noise, dropout, optimizer and EMA state all continue."""
    config = tiny_train_config(decoder_steps=10, diffusion_steps=6, ema_decay=0.9, device=device)
    train(TINY_TEXTS, tmp_path / "whole", SELF_CONDITIONED, config, **QUIET)

    budget_left = Trainer._budget_left

    def stopped(self, stage):
        if STAGES.index(stage) > STAGES.index(stop_stage):
            return False
        return budget_left(self, stage) and not (stage == stop_stage and self.state["steps"][stage] >= stop_step)

    monkeypatch.setattr(Trainer, "_budget_left", stopped)
    summary = train(TINY_TEXTS, tmp_path / "parts", SELF_CONDITIONED, config, **QUIET)
    assert summary[stop_stage]["steps"] == stop_step
    monkeypatch.undo()
    train(TINY_TEXTS, tmp_path / "parts", SELF_CONDITIONED, config, resume=True, **QUIET)
    assert_same_weights(weights(tmp_path / "whole"), weights(tmp_path / "parts"), device)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains_close_to_fp32(tmp_path, device):
    config = tiny_train_config(decoder_steps=12, diffusion_steps=12, device=device)
    fp32 = train(TINY_TEXTS, tmp_path / "fp32", SELF_CONDITIONED, config, **QUIET)
    bf16 = train(TINY_TEXTS, tmp_path / "bf16", SELF_CONDITIONED, dataclasses.replace(config, precision="bf16"), **QUIET)
    for stage in STAGES:
        assert bf16[stage]["val_loss"] != fp32[stage]["val_loss"], f"{stage}: autocast did not take effect"
        assert bf16[stage]["val_loss"] == pytest.approx(fp32[stage]["val_loss"], rel=0.05), stage
    assert ldlm.load(tmp_path / "bf16").reconstruct(["the cat sat on the mat."], progress=False)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        tiny_train_config(precision="fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("latent_tokens", [1, 2])
def test_training_on_cuda_tracks_the_cpu(tmp_path, latent_tokens):
    """The same draws on either device (they come from one CPU generator): the reverse transformer, which has no
    dropout, ends within float tolerance of the CPU's; the decoder (dropout masks come from each device's own
    generator) close to it. The checkpoint loads and generates on the CPU."""
    model = dataclasses.replace(SELF_CONDITIONED, latent_tokens=latent_tokens, n_prefix=2)
    config = tiny_train_config(decoder_steps=20, diffusion_steps=10)
    cpu = train(TINY_TEXTS, tmp_path / "cpu", model, config, **QUIET)
    cuda = train(TINY_TEXTS, tmp_path / "cuda", model, dataclasses.replace(config, device="cuda"), **QUIET)
    assert cuda["decoder"]["val_loss"] == pytest.approx(cpu["decoder"]["val_loss"], rel=0.02)
    if latent_tokens == 1:  # (with K tokens stage 2 learns the resampler's latents, which dropout also moved)
        assert cuda["diffusion"]["val_loss"] == pytest.approx(cpu["diffusion"]["val_loss"], rel=1e-4)
    pipe = ldlm.load(tmp_path / "cuda")
    assert len(pipe.generate(2, sampler="ddim", steps=3, seed=0, progress=False)) == 2


def test_a_device_this_machine_lacks_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="cannot train on device 'gpu0'.*e.g. --device cpu"):
        train(TINY_TEXTS, tmp_path / "m", SELF_CONDITIONED, tiny_train_config(device="gpu0"), **QUIET)
    if torch.cuda.is_available():
        return
    data = tmp_path / "data.txt"
    data.write_text("\n".join(TINY_TEXTS))
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m"), "--preset", "tiny", "--device", "cuda",
                 "--no-progress"]) == 2
    assert "cannot train on device 'cuda'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists(), "the error should come before any work"
    assert main(["baseline", "train", "--data", str(data), "--out", str(tmp_path / "lm"), "--preset", "tiny",
                 "--steps", "2", "--time-budget", "0", "--device", "cuda", "--no-progress"]) == 2
    assert "cannot train on device 'cuda'" in capsys.readouterr().err


def test_the_bar_shows_the_time_left_by_the_first_limit():
    from ldlm.training.train import _time_left

    assert _time_left(10, 5.0, 0.5, max_steps=130, max_seconds=None) == "1m00s"  # 120 steps of 0.5 s
    assert _time_left(10, 5.0, 0.5, max_steps=None, max_seconds=35.0) == "0m30s"  # the time budget
    assert _time_left(10, 5.0, 0.5, max_steps=20, max_seconds=600.0) == "0m05s"  # whichever comes first
    assert _time_left(10, 50.0, 0.5, max_steps=None, max_seconds=35.0) == "0m00s"


def _logged_training(texts, out, config, **kwargs) -> list[str]:
    lines: list[str] = []
    train(texts, out, config, tiny_train_config(decoder_steps=2, diffusion_steps=2, **kwargs), progress=False,
          log=lines.append, encoding_cache=out.parent / "encoded")
    return lines


def test_the_encoded_corpus_is_reused_exactly_when_nothing_that_decides_it_changed(tmp_path):
    tiny = ModelConfig.from_preset("tiny")
    assert not any("reused" in line for line in _logged_training(TINY_TEXTS, tmp_path / "a", tiny))
    # other steps or seeds of the optimizer leave the encoding as it was
    assert any("encoded corpus: reused" in line for line in _logged_training(TINY_TEXTS, tmp_path / "b", tiny,
                                                                               warmup_steps=3))
    # what changes the encoding: the texts, the encoder's token limit, its weights (another seed's tiny encoder)
    changed = [(TINY_TEXTS[:-1] + ["A different last sentence for the corpus."], tiny),
               (TINY_TEXTS, dataclasses.replace(tiny, encoder_max_tokens=8))]
    for i, (texts, config) in enumerate(changed):
        assert not any("reused" in line for line in _logged_training(texts, tmp_path / f"c{i}", config))
    assert not any("reused" in line for line in _logged_training(TINY_TEXTS, tmp_path / "d", tiny, seed=1))
    stored = load_file(str(next((tmp_path / "encoded").glob("latents-*.safetensors"))))
    assert set(stored) == {"train", "val", "key"}


def test_loading_a_checkpoint_prints_no_third_party_bar(tiny_checkpoint, capfd):
    capfd.readouterr()
    ldlm.load(tiny_checkpoint)
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(tmp_path, capsys):
    """Two runs on one --out (fresh, or both --resume) used to both exit 0, the last save winning and the log
    mixing both (issue 37): the folder is held for the whole run."""
    out = tmp_path / "model"
    config = ModelConfig.from_preset("tiny")
    with training_lock(out):  # another run, holding the folder
        with pytest.raises(FileExistsError, match=rf"{out} is being trained by another run \(ldlm train, process "
                                                   rf"\d+ on .*pass another --out"):
            train(TINY_TEXTS, out, config, tiny_train_config(), progress=False, log=lambda *_: None)
        assert main(["train", "--data", str(_write_lines(tmp_path / "d.txt")), "--out", str(out), "--preset", "tiny",
                     "--time-budget", "0", "--decoder-steps", "1", "--diffusion-steps", "1", "--no-progress"]) == 2
        assert "is being trained by another run" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    train(TINY_TEXTS, out, config, tiny_train_config(decoder_steps=2, diffusion_steps=2), progress=False,
          log=lambda *_: None)  # once the holder is gone
    assert (out / "config.json").is_file() and ldlm.load(out).config == ldlm.load(out).config


def _write_lines(path):
    path.write_text("\n".join(TINY_TEXTS))
    return path


def test_out_may_not_be_or_lie_inside_a_model(tiny_checkpoint, tmp_path):
    config, quiet = ModelConfig.from_preset("tiny"), {"progress": False, "log": lambda *_: None}
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="is an export .* pass a new folder"):
        train(TINY_TEXTS, export, config, tiny_train_config(), **quiet)
    for inner in (tiny_checkpoint / "tokenizer", tiny_checkpoint / "training" / "run", export / "sub"):
        with pytest.raises(ValueError, match=r"lies inside (a checkpoint|an export), .*pass a folder outside it"):
            train(TINY_TEXTS, inner, config, tiny_train_config(), **quiet)
    assert not (tiny_checkpoint / "training" / "run").exists() and sorted(p.name for p in export.iterdir()) == [
        "manifest.json"]


def test_too_few_texts_is_a_clear_error(tmp_path):
    """Two lines used to train for a step and fail with "diffusion loss became nan: lower the learning rate": the
    one training latent has no spread to normalize by."""
    with pytest.raises(ValueError, match="training needs at least 3 texts .* got 2"):
        train(TINY_TEXTS[:2], tmp_path / "m", ModelConfig.from_preset("tiny"), tiny_train_config(), progress=False,
              log=lambda *_: None)
    assert not (tmp_path / "m").exists()
