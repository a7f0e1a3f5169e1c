"""Checkpoints: a directory of safetensors files plus one JSON config. No pickle anywhere.

    config.json               format version, ldlm version, model config, encoder reference, GPT-2 config
    latent_stats.safetensors  per-dimension mean and std of the training latents
    reverse.safetensors       reverse transformer
    resampler.safetensors     only with latent_tokens > 1: the resampler making K latent tokens (ldlm.resampler)
    decoder.safetensors       GPT-2 and the prefix projection
    tokenizer/                the decoder's tokenizer (tokenizer.json)
    encoder/                  only when the encoder was built in code (tiny preset): its weights and tokenizer
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import GPT2Config, GPT2LMHeadModel

from . import __version__
from .config import ModelConfig
from .decoder import LatentDecoder, load_tokenizer
from .encoder import LatentEncoder
from .resampler import LatentResampler
from .reverse import ReverseTransformer

FORMAT = "ldlm-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file and what to do."""


@dataclass
class Components:
    """Everything a checkpoint holds, as live modules."""

    config: ModelConfig
    encoder: LatentEncoder
    decoder: LatentDecoder
    reverse: ReverseTransformer
    latent_mean: torch.Tensor  # config.latent_shape: (D,), or (K, D)
    latent_std: torch.Tensor  # config.latent_shape
    encoder_bundled: bool  # weights live in the checkpoint (built in code) rather than at config.encoder


def save_checkpoint(c: Components, directory: str | Path) -> Path:
    """Write atomically enough for periodic saves: files first, config.json (the marker of a complete save) last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"mean": c.latent_mean.contiguous().cpu(), "std": c.latent_std.contiguous().cpu()},
              directory / "latent_stats.safetensors")
    save_model(c.reverse, str(directory / "reverse.safetensors"))
    if c.encoder.resampler is not None:
        save_model(c.encoder.resampler, str(directory / "resampler.safetensors"))
    save_model(c.decoder, str(directory / "decoder.safetensors"))
    c.decoder.tokenizer.save_pretrained(directory / "tokenizer")
    if c.encoder_bundled:
        c.encoder.save_pretrained(directory / "encoder")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ldlm_version": __version__,
        "model": c.config.to_dict(),
        "encoder": {"bundled": c.encoder_bundled, "name_or_path": c.config.encoder, "hidden_size": c.encoder.latent_dim},
        "gpt2": c.decoder.gpt2.config.to_diff_dict(),
    }
    tmp = directory / "config.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(directory / "config.json")
    return directory


def _read_meta(directory: Path) -> dict:
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory: pass the folder `ldlm train --out` wrote")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} is not an ldlm checkpoint (or its save did not finish)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is corrupt; retrain or restore it") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an ldlm checkpoint config (no \"format\": \"{FORMAT}\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {meta.get('format_version')!r}, this ldlm ({__version__}) reads "
            f"{FORMAT_VERSION}: use the ldlm version that wrote it ({meta.get('ldlm_version')})"
        )
    return meta


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; retrain or restore it")


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header, without reading the weights."""
    _check_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}): it is corrupt; retrain or restore it") from e


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    mismatched = [f"{k}: file {shape} vs config {expected[k]}"
                  for k, shape in _shapes(path).items() if k in expected and expected[k] != shape]
    if mismatched:
        raise CheckpointError(f"{path} does not match config.json: shapes differ for {mismatched[:3]}")
    missing, unexpected = load_model(module, str(path), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match config.json: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )


def _load_latent_stats(path: Path, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    shapes = _shapes(path)
    if shapes != {"mean": shape, "std": shape}:
        raise CheckpointError(f"{path} must hold mean and std of shape {shape}, holds {shapes}")
    return load_file(str(path))


def _model_config(directory: Path, meta: dict) -> ModelConfig:
    try:
        return ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'} has an invalid model config: {e}") from e


def load_config(directory: str | Path) -> ModelConfig:
    """A checkpoint's model config, checked as load_checkpoint checks it, without loading any weights."""
    directory = Path(directory)
    return _model_config(directory, _read_meta(directory))


def load_checkpoint(directory: str | Path) -> Components:
    directory = Path(directory)
    meta = _read_meta(directory)
    config = _model_config(directory, meta)

    enc = meta.get("encoder", {})
    if enc.get("bundled"):
        encoder = LatentEncoder.from_pretrained(str(directory / "encoder"), config.encoder_max_tokens)
    else:
        encoder = LatentEncoder.from_pretrained(config.encoder, config.encoder_max_tokens)
    if encoder.latent_dim != config.latent_dim:
        raise CheckpointError(
            f"encoder {config.encoder!r} has hidden size {encoder.latent_dim} but the checkpoint was trained on "
            f"{config.latent_dim}-d latents: load it with the encoder it was trained with"
        )

    if config.latent_tokens > 1:
        encoder.resampler = LatentResampler(config)
        _load_weights(encoder.resampler, directory / "resampler.safetensors")
        encoder.resampler.eval()
    stats = _load_latent_stats(directory / "latent_stats.safetensors", config.latent_shape)

    reverse = ReverseTransformer(config)
    _load_weights(reverse, directory / "reverse.safetensors")
    gpt2 = GPT2LMHeadModel(GPT2Config.from_dict(meta["gpt2"]))
    decoder = LatentDecoder(config, gpt2, load_tokenizer(directory / "tokenizer"))
    _load_weights(decoder, directory / "decoder.safetensors")
    return Components(config, encoder, decoder.eval(), reverse.eval(), stats["mean"], stats["std"],
                      encoder_bundled=bool(enc.get("bundled")))
