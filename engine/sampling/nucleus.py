"""Nucleus (top-p) sampling for the latent-conditioned decoder (Holtzman et al. 2020), an alternative to beam
search: beam search picks each latent's most likely phrasing, which on E2E collapses the corpus's varied
wording into a few templates (Div of reconstructions 0.037 against the references' 0.121); sampling keeps it.

It uses only the decoder's prefill/step interface, so the PyTorch decoder and the ONNX one both run it.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def nucleus_decode(decoder, latents: torch.Tensor, *, top_p: float = 0.95, max_new_tokens: int = 64,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """latents (B, *latent_shape) -> token ids per item (EOS removed), each token drawn from the smallest set of most
    likely tokens whose probabilities sum to at least top_p."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    B, eos = latents.shape[0], decoder.eos_token_id
    logits, cache = decoder.prefill(latents)
    tokens = torch.full((B, max_new_tokens), eos, dtype=torch.long, device=latents.device)
    done = torch.zeros(B, dtype=torch.bool, device=latents.device)
    for cur in range(max_new_tokens):
        if cur > 0:
            logits, cache = decoder.step(tokens[:, cur - 1 : cur], cache)
        probs = torch.softmax(logits.float(), dim=-1)  # (B, V)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # tokens after the nucleus is full
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator).to(order.device)  # (B, 1)
        token = order.gather(1, choice).squeeze(1)
        tokens[:, cur] = torch.where(done, torch.full_like(token, eos), token)
        done |= token == eos
        if bool(done.all()):
            break
    results = []
    for row in tokens.tolist():
        results.append(row[: row.index(eos)] if eos in row else row)
    return results
