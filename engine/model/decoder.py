"""The decoder: GPT-2 conditioned on a latent through learned prefix embeddings, and its tokenizer."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from ldlm.model.config import ModelConfig
from ldlm.model.model_files import (DECODER_MODEL_TYPES, ModelFileError, check_model_folder, check_model_weights,
                                    check_tokenizer_folder, load_pretrained, local_folder)

EOS = "<|endoftext|>"  # GPT-2's only special token: end of text, also used as padding

# transformers renamed `past_key_values` to `cache` in 5.2x; support both (the GPU image has 5.17)
_CACHE_ARG = "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


def train_bpe_tokenizer(texts: list[str], vocab_size: int, extra_special: list[str] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's scheme) trained on the corpus: any text round-trips through it. EOS, and
    `extra_special` tokens (a separator), are single tokens of their own."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return wrap_tokenizer(tokenizer)


def wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def load_tokenizer(path: str | Path, vocab_size: int | None = None, saved_size: object = None):
    """A tokenizer folder, checked first (ldlm.model.model_files: transformers' own classes, no custom code). With
    `vocab_size`, the vocabulary of the network it feeds, which it must not exceed (its ids index the
    embedding); with `saved_size` (how many tokens the tokenizer saved with the model had, where the model
    folder records it), it must be that one: another model's would decode to the wrong words."""
    path = Path(path)
    check_tokenizer_folder(path, f"the tokenizer at {path}")
    try:
        tokenizer = load_pretrained(AutoTokenizer, path)
    except Exception as e:  # transformers answers a broken tokenizer.json in several ways, JSONDecodeError too
        raise ModelFileError(f"{path} does not load as a tokenizer ({type(e).__name__}: {str(e)[:160]}): its "
                             "tokenizer.json is missing or corrupt; restore the folder from the model it came "
                             "with") from e
    if tokenizer.pad_token is None:  # pretrained GPT-2 has no pad token: pad with EOS (masked everywhere)
        tokenizer.pad_token = tokenizer.eos_token
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ModelFileError(f"{path} holds a tokenizer of {len(tokenizer)} tokens, more than the {vocab_size} of the "
                             "network it feeds: it belongs to another model; restore the tokenizer saved with it")
    if type(saved_size) is int and len(tokenizer) != saved_size:
        raise ModelFileError(f"{path} holds a tokenizer of {len(tokenizer)} tokens, but the one saved with this model "
                             f"had {saved_size}: it belongs to another model; restore the tokenizer saved with it")
    return tokenizer


def gpt2_config(config: ModelConfig, tokenizer) -> GPT2Config:
    eos = tokenizer.eos_token_id
    return GPT2Config(
        vocab_size=len(tokenizer), n_positions=config.n_positions, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )


class LatentDecoder(nn.Module):
    """GPT-2 reading `n_prefix` embeddings made from the latent, then the text tokens."""

    def __init__(self, config: ModelConfig, gpt2: GPT2LMHeadModel, tokenizer):
        super().__init__()
        self.config = config
        self.gpt2 = gpt2
        self.tokenizer = tokenizer
        n_embd = gpt2.config.n_embd
        # each latent token (D,) -> n_prefix / K prefix embeddings: a small MLP, as in prefix tuning
        per_token = config.n_prefix // config.latent_tokens
        self.prefix_proj = nn.Sequential(
            nn.Linear(config.latent_dim, n_embd), nn.GELU(), nn.Linear(n_embd, per_token * n_embd)
        )

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def prefix(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (B, D), or (B, K, D) latent tokens -> prefix embeddings (B, n_prefix, n_embd)."""
        return self.prefix_proj(latents).reshape(latents.shape[0], self.config.n_prefix, -1)

    def prefill(self, latents: torch.Tensor, repeats: int = 1):
        """Run the prefix of each latent (B, *latent_shape): next-token logits (B * repeats, V) and the KV cache of
        the prefix, item b's in rows b * repeats ... b * repeats + repeats - 1 (its beams: computed once, copied)."""
        out = self.gpt2(inputs_embeds=self.prefix(latents), use_cache=True)
        logits, cache = out.logits[:, -1, :], getattr(out, _CACHE_ARG)
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
            logits = logits.repeat_interleave(repeats, dim=0)
        return logits, cache

    def step(self, input_ids: torch.Tensor, cache):
        """One token per row (R, 1) on top of `cache`: next-token logits (R, V) and the grown cache."""
        out = self.gpt2(input_ids=input_ids, use_cache=True, **{_CACHE_ARG: cache})
        return out.logits[:, -1, :], getattr(out, _CACHE_ARG)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> right-padded (input_ids, attention_mask), each cut to max_text_tokens and ended by EOS."""
        return self.pad(self.tokenizer(texts)["input_ids"])

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token id lists -> right-padded (input_ids, attention_mask) (B, L), each cut and ended by EOS."""
        rows = [ids[: self.config.max_text_tokens] + [self.eos_token_id] for ids in rows]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        return input_ids, attention_mask

    def forward(self, latents: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced token logits (B, L, V): position n_prefix-1+i predicts input_ids[:, i]."""
        prefix = self.prefix(latents)  # (B, P, E)
        tokens = self.gpt2.transformer.wte(input_ids)  # (B, L, E)
        P = prefix.shape[1]
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], P), attention_mask], dim=1)  # (B, P+L)
        logits = self.gpt2(inputs_embeds=torch.cat([prefix, tokens], dim=1), attention_mask=mask).logits
        return logits[:, P - 1 : -1, :]  # (B, L, V)

    def loss(self, latents: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over real (unpadded) tokens."""
        logits = self(latents, input_ids, attention_mask)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    @classmethod
    def build(cls, config: ModelConfig, texts: list[str] | None = None) -> LatentDecoder:
        """A pretrained GPT-2 (config.decoder) or one built from the config with a BPE trained on `texts`."""
        if config.decoder is not None:  # named by the user who trains: fetched from the hub if need be
            folder = local_folder(config.decoder, "decoder", download=True)
            values = check_model_folder(folder, DECODER_MODEL_TYPES, f"the decoder at {folder}")
            check_model_weights(folder, GPT2Config.from_dict(values), "h", f"the decoder at {folder}")
            gpt2 = load_pretrained(GPT2LMHeadModel, folder, use_safetensors=True)
            return cls(config, gpt2, load_tokenizer(folder))
        if not texts:
            raise ValueError("a decoder built from a config needs the training texts to train its tokenizer")
        tokenizer = train_bpe_tokenizer(texts, config.vocab_size)
        return cls(config, GPT2LMHeadModel(gpt2_config(config, tokenizer)), tokenizer)
