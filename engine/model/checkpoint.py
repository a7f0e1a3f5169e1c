"""Checkpoints: a directory of safetensors files plus one JSON config. No pickle anywhere.

    config.json               format version, ldlm version, model config, encoder reference, GPT-2 config
    latent_stats.safetensors  per-dimension mean and std of the training latents
    reverse.safetensors       reverse transformer
    resampler.safetensors     only with latent_tokens > 1: the resampler making K latent tokens (ldlm.model.resampler)
    decoder.safetensors       GPT-2 and the prefix projection
    tokenizer/                the decoder's tokenizer (tokenizer.json)
    encoder/                  only when the encoder was built in code (tiny preset): its weights and tokenizer
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from transformers import GPT2Config, GPT2LMHeadModel

from ldlm import __version__
from ldlm.model.config import DEFAULT_ENCODER, ModelConfig
from ldlm.model.decoder import LatentDecoder, load_tokenizer
from ldlm.model.encoder import LatentEncoder
from ldlm.model.model_files import (ModelFileError, check_weight_shapes, folder_files, header_shapes, inside, is_hub_id,
                                    transformers_bars_off)
from ldlm.model.resampler import LatentResampler
from ldlm.model.reverse import ReverseTransformer

FORMAT = "ldlm-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ModelFileError):
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
        with transformers_bars_off():
            c.encoder.save_pretrained(directory / "encoder")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ldlm_version": __version__,
        "model": c.config.to_dict(),
        "encoder": {"bundled": c.encoder_bundled, "name_or_path": c.config.encoder, "hidden_size": c.encoder.latent_dim},
        "gpt2": c.decoder.gpt2.config.to_diff_dict(),
        "tokenizer_size": len(c.decoder.tokenizer),  # checked at load: the tokenizer saved with these weights
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


def _load_weights(module: torch.nn.Module, path: Path) -> None:
    """Weights whose shapes check_weight_shapes has already compared with the config."""
    missing, unexpected = load_model(module, str(path), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match config.json: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )


def _load_latent_stats(path: Path, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    shapes = header_shapes(path)
    if shapes != {"mean": shape, "std": shape}:
        raise CheckpointError(f"{path} must hold mean and std of shape {shape}, holds {shapes}")
    stats = load_file(str(path))
    check_latent_stats(stats["mean"], stats["std"], str(path))
    return stats


def check_latent_stats(mean: torch.Tensor, std: torch.Tensor, where: str) -> None:
    """The latent statistics every sample is scaled by (a checkpoint's or an export's): finite, std > 0, or a
    CheckpointError naming where they came from and the first bad dimension."""
    for name, values, ok in (("mean", mean, torch.isfinite(mean)), ("std", std, torch.isfinite(std) & (std > 0))):
        bad = (~ok).flatten().nonzero().flatten()
        if len(bad):
            raise CheckpointError(f"{where}: the latent {name} is {values.flatten()[bad[0]].item()} in dimension "
                                  f"{bad[0].item()} ({len(bad)} of {values.numel()} bad); it must be finite"
                                  f"{' and above 0' if name == 'std' else ''}: retrain, or export the checkpoint again")


def _model_config(directory: Path, meta: dict) -> ModelConfig:
    try:
        return ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'} has an invalid model config: {e}") from e


def load_config(directory: str | Path) -> ModelConfig:
    """A checkpoint's model config, checked as load_checkpoint checks it, without loading any weights."""
    directory = Path(directory)
    return _model_config(directory, _read_meta(directory))


def _gpt2_config(directory: Path, meta: dict) -> GPT2Config:
    values = meta.get("gpt2")
    path = directory / "config.json"
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} has no \"gpt2\" decoder config: the checkpoint is corrupt; retrain or "
                              "restore it")
    if values.get("model_type", "gpt2") != "gpt2" or "auto_map" in values:
        raise CheckpointError(f"{path} describes a {values.get('model_type')!r} decoder with custom code or another "
                              "architecture; ldlm decodes with GPT-2 only")
    try:
        return GPT2Config.from_dict(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path} has an invalid \"gpt2\" config: {e}") from e


def _check_sizes(directory: Path, config: ModelConfig, gpt2: GPT2Config) -> None:
    """Every module's shapes against its weight file's header, before any module is built for real: a config
    that does not belong to its weights (a hostile one could ask for hundreds of GB) stops here."""
    what = "config.json"
    check_weight_shapes(lambda: ReverseTransformer(config), directory / "reverse.safetensors",
                        {"blocks": config.n_layers}, what)
    check_weight_shapes(lambda: LatentDecoder(config, GPT2LMHeadModel(gpt2), tokenizer=None),
                        directory / "decoder.safetensors", {"gpt2.transformer.h": gpt2.n_layer}, what)
    if config.latent_tokens > 1:
        check_weight_shapes(lambda: LatentResampler(config), directory / "resampler.safetensors",
                            {"layers": config.resampler_layers}, what)


def _load_encoder(directory: Path, meta: dict, config: ModelConfig) -> tuple[LatentEncoder, bool]:
    """The encoder from the checkpoint's folder, or the shipped default, or a hub id from the local cache: never
    a path outside the checkpoint, never a download."""
    enc = meta.get("encoder")
    path = directory / "config.json"
    if not isinstance(enc, dict) or not isinstance(enc.get("bundled", False), bool):
        raise CheckpointError(f"{path} has no \"encoder\" entry saying where the encoder is: the checkpoint is "
                              "corrupt; retrain or restore it")
    if enc.get("bundled"):
        return LatentEncoder.from_folder(inside(directory, "encoder", "the bundled encoder"),
                                         config.encoder_max_tokens), True
    name = config.encoder
    if not isinstance(name, str) or (name != DEFAULT_ENCODER and not is_hub_id(name)):
        raise CheckpointError(f"{path} names its encoder {name!r}, which is not a hub id and not in the checkpoint: "
                              "ldlm reads only the checkpoint's folder; save the checkpoint with its encoder bundled "
                              "(`ldlm train` bundles an encoder given as a local folder)")
    return LatentEncoder.from_pretrained(name, config.encoder_max_tokens), False


def load_checkpoint(directory: str | Path) -> Components:
    """A checkpoint's parts, after checking, from its files alone, that every file lies inside its folder, that
    no custom code would run, and that the configs match the weights (ldlm.model.model_files)."""
    try:
        return _load_checkpoint(Path(directory))
    except CheckpointError:
        raise
    except ModelFileError as e:  # a check of ldlm.model.model_files: the same kind of error for the caller
        raise CheckpointError(str(e)) from e


def _load_checkpoint(directory: Path) -> Components:
    meta = _read_meta(directory)
    config = _model_config(directory, meta)
    gpt2_config = _gpt2_config(directory, meta)
    folder_files(directory)
    _check_sizes(directory, config, gpt2_config)
    stats = _load_latent_stats(directory / "latent_stats.safetensors", config.latent_shape)
    tokenizer_folder = inside(directory, "tokenizer", "the decoder's tokenizer")

    encoder, bundled = _load_encoder(directory, meta, config)
    if encoder.latent_dim != config.latent_dim:
        raise CheckpointError(
            f"encoder {config.encoder!r} has hidden size {encoder.latent_dim} but the checkpoint was trained on "
            f"{config.latent_dim}-d latents: load it with the encoder it was trained with"
        )
    if config.latent_tokens > 1:
        encoder.resampler = LatentResampler(config)
        _load_weights(encoder.resampler, directory / "resampler.safetensors")
        encoder.resampler.eval()

    reverse = ReverseTransformer(config)
    _load_weights(reverse, directory / "reverse.safetensors")
    decoder = LatentDecoder(config, GPT2LMHeadModel(gpt2_config),
                            load_tokenizer(tokenizer_folder, vocab_size=gpt2_config.vocab_size,
                                           saved_size=meta.get("tokenizer_size")))
    _load_weights(decoder, directory / "decoder.safetensors")
    return Components(config, encoder, decoder.eval(), reverse.eval(), stats["mean"], stats["std"],
                      encoder_bundled=bundled)
