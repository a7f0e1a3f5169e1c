"""A training run's corpus through the frozen encoder: pooled latents, token states (for the resampler) and a
text-conditional model's source states, each encoded once and cached by what decides it, so that a resumed run
or another run on the same texts and encoder encodes nothing again."""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file


class EncodedCorpus:
    """The encodings of a run's train and validation texts. `cache_dir`: a folder shared across runs (the demo's),
    where encodings are kept by key; None: the run's own `state_dir` (training/), one file a kind."""

    def __init__(self, encoder, train_texts: list[str], val_texts: list[str], *, state_dir: Path,
                 cache_dir: Path | None, progress: bool, log: Callable[[str], None]):
        self.encoder, self.train_texts, self.val_texts = encoder, train_texts, val_texts
        self.state_dir, self.encoding_cache, self.progress, self.log = state_dir, cache_dir, progress, log

    @functools.cached_property
    def encoder_identity(self) -> str:
        """The frozen encoder's digest (its weights hashed once a run: they never change)."""
        return self.encoder.frozen_identity()

    def key(self, kind: str, texts: dict[str, list[str]]) -> str:
        """What decides an encoded corpus: the frozen encoder (weights, tokenizer, token limit), what is kept
        (pooled latents or token states) and the texts of each split, in order. Not the steps, the seed's
        other uses or the package version, so a run that changes only those reuses the encoding."""
        digest = hashlib.sha256(f"{kind}\0{self.encoder_identity}\0".encode())
        for split, values in texts.items():
            digest.update(f"\0{split}:{len(values)}\0".encode())
            for text in values:
                digest.update(text.encode() + b"\n")
        return digest.hexdigest()[:32]

    def cached(self, kind: str, encode, texts: dict[str, list[str]] | None = None) -> dict[str, torch.Tensor]:
        """`encode()`'s tensors, from the cache when its key matches: training/{kind}.safetensors, or with a
        shared `encoding_cache` folder (the demo's) {kind}-{key}.safetensors there, reused across runs.
        `texts`: what was encoded, by split (default: the train and validation texts)."""
        texts = texts or {"train": self.train_texts, "val": self.val_texts}
        key = self.key(kind, texts)
        cache = (self.encoding_cache / f"{kind}-{key}.safetensors" if self.encoding_cache
                 else self.state_dir / f"{kind}.safetensors")
        if cache.is_file():
            stored = load_file(str(cache))
            if "key" in stored and bytes(stored.pop("key").tolist()).decode() == key:
                self.log(f"encoded corpus: reused {cache}")
                return stored
        start = time.perf_counter()
        tensors = encode()
        n = sum(map(len, texts.values()))
        seconds = time.perf_counter() - start
        self.log(f"encoded {n} texts ({kind.replace('_', ' ')}) in {seconds:.1f}s ({n / max(seconds, 1e-9):.0f}/s)")
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial")  # a run killed while writing leaves no half file under the name
        save_file({**tensors, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, str(partial))
        partial.replace(cache)
        return tensors

    def latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of the train and validation texts, encoded once and cached (see cached)."""
        encoder = self.encoder

        def encode() -> dict[str, torch.Tensor]:
            bar = "encoding" if self.progress else None
            return {"train": encoder.encode(self.train_texts, progress=bar).cpu(),
                    "val": encoder.encode(self.val_texts).cpu() if self.val_texts
                    else torch.empty(0, encoder.latent_dim)}

        stored = self.cached("latents", encode)
        return stored["train"], stored["val"]

    def token_states(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The frozen encoder's token states of the train and validation texts (what the resampler reads), encoded
        once and cached as one flat (tokens, D) tensor and the texts' lengths."""
        encoder = self.encoder

        def encode() -> dict[str, torch.Tensor]:
            train = encoder.token_states(self.train_texts, progress="encoding" if self.progress else None)
            val = encoder.token_states(self.val_texts)
            empty = torch.empty(0, encoder.latent_dim)
            return {"train": torch.cat(train) if train else empty, "val": torch.cat(val) if val else empty,
                    "train_lengths": torch.tensor([len(s) for s in train], dtype=torch.long),
                    "val_lengths": torch.tensor([len(s) for s in val], dtype=torch.long)}

        stored = self.cached("token_states", encode)
        return (list(stored["train"].split(stored["train_lengths"].tolist())),
                list(stored["val"].split(stored["val_lengths"].tolist())))

    def source_states(self, sources: list[str]) -> list[torch.Tensor]:
        """The token states (L_i, D) of each distinct source of a text-conditional model, encoded once."""
        encoder = self.encoder

        def encode() -> dict[str, torch.Tensor]:
            states = encoder.token_states(sources, progress="encoding sources" if self.progress else None)
            return {"states": torch.cat(states), "lengths": torch.tensor([len(s) for s in states], dtype=torch.long)}

        stored = self.cached("source_states", encode, {"sources": sources})
        return list(stored["states"].split(stored["lengths"].tolist()))
