"""Reference batched beam search for the latent-conditioned GPT-2 decoder.

The algorithm is Hugging Face transformers' vectorized beam search (v5 `_beam_search`), written out
plainly: per step, keep the 2K best (beam, token) continuations of each item; the K best that did
not end become the next beams; candidates among the top K that ended (EOS or the length bound) enter
the item's K finished hypotheses, scored by sum of log-probs / length**length_penalty. The cache
grows with each token (HF's DynamicCache) and is reordered by beam every step. Tokens match
`GPT2LMHeadModel.generate(inputs_embeds=prefix, num_beams=K, ...)` on the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldlm.model.decoder import LatentDecoder

NEG_INF = -1.0e9  # HF's stand-in for "impossible" in beam bookkeeping
MAX_NUM_BEAMS = 32  # a bound on what a user can ask (and the native kernel's per-item candidate array)


@dataclass(frozen=True)
class BeamSearchConfig:
    num_beams: int = 4  # K beams per item
    max_new_tokens: int = 64  # length bound (EOS included)
    no_repeat_ngram_size: int = 3  # ban any n-gram from appearing twice; 0 turns it off
    length_penalty: float = 1.0  # finished score = sum log-prob / length**length_penalty
    early_stopping: bool = True  # an item is done once it has K finished hypotheses

    def __post_init__(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or not (
                1 <= self.num_beams <= MAX_NUM_BEAMS):
            raise ValueError(f"num_beams must be a whole number from 1 to {MAX_NUM_BEAMS}, got {self.num_beams!r} "
                             "(past 8 beams rarely changes a text; each beam costs a decoder row per item)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


def ban_repeated_ngrams(log_probs: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Set to -inf every token that would repeat an n-gram already in `tokens`.

    log_probs: (R, V); tokens: (R, L) generated so far. Vectorized over rows: compare the last n-1
    tokens with every earlier window of n-1 and ban the token that followed each match.
    """
    R, L = tokens.shape
    if n <= 0 or L < n:  # no complete n-gram yet
        return log_probs
    if n == 1:
        return log_probs.scatter(1, tokens, float("-inf"))
    windows = tokens.unfold(1, n, 1)  # (R, L-n+1, n)
    matches = (windows[:, :, :-1] == tokens[:, None, L - n + 1 :]).all(dim=-1)  # (R, L-n+1)
    rows, cols = matches.nonzero(as_tuple=True)
    banned = log_probs.clone()
    banned[rows, windows[rows, cols, -1]] = float("-inf")
    return banned


def best_hypotheses(finished: torch.Tensor, eos: int) -> list[list[int]]:
    """finished (B, K, T) hypotheses, best first -> each item's best token ids, EOS and what follows removed."""
    results = []
    for tokens in finished[:, 0, :].tolist():
        results.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    return results


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor (B, N, ...) indexed along dim 1 by indices (B, M) -> (B, M, ...)."""
    idx = indices.view(*indices.shape, *([1] * (tensor.dim() - 2))).expand(*indices.shape, *tensor.shape[2:])
    return tensor.gather(1, idx)


@torch.no_grad()
def beam_search(decoder: LatentDecoder, latents: torch.Tensor, config: BeamSearchConfig) -> list[list[int]]:
    """latents (B, *latent_shape) -> for each item, the best hypothesis' token ids (EOS removed)."""
    B, K, T = latents.shape[0], config.num_beams, config.max_new_tokens
    device = latents.device
    eos, pad = decoder.eos_token_id, decoder.pad_token_id

    logits, cache = decoder.prefill(latents.repeat_interleave(K, dim=0))  # every beam starts from the prefix

    running = torch.full((B, K, T), pad, dtype=torch.long, device=device)  # live beams' tokens
    running_scores = torch.zeros(B, K, device=device)  # (B, K) sum of log-probs
    running_scores[:, 1:] = NEG_INF  # all beams start equal: only the first may expand at step 0
    finished = running.clone()  # (B, K, T) best finished hypotheses
    finished_scores = torch.full((B, K), NEG_INF, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)  # slot holds a real hypothesis
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # could a live beam still beat the finished?
    top_k_mask = torch.arange(2 * K, device=device) < K  # only the top K candidates may finish
    batch_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1)

    for cur in range(T):
        if cur > 0:
            logits, cache = decoder.step(running.view(B * K, T)[:, cur - 1 : cur], cache)  # the token chosen last
        V = logits.shape[-1]
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        log_probs = ban_repeated_ngrams(log_probs, running.view(B * K, T)[:, :cur], config.no_repeat_ngram_size)
        scores = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)

        cand_scores, cand_index = scores.topk(2 * K, dim=1)  # (B, 2K)
        cand_beam, cand_token = cand_index // V, cand_index % V
        candidates = _gather_beams(running, cand_beam)  # (B, 2K, T)
        candidates[:, :, cur] = cand_token
        ended = (cand_token == eos) | (cur + 1 >= T)  # (B, 2K)

        # next live beams: the K best candidates that did not end
        live_scores = cand_scores + ended.float() * NEG_INF
        keep = live_scores.topk(K, dim=1).indices  # (B, K)
        running = _gather_beams(candidates, keep)
        running_scores = _gather_beams(live_scores, keep)
        source_beam = _gather_beams(cand_beam, keep)  # (B, K) which old beam each new one extends

        # finished hypotheses: merge the newly ended top-K candidates, keep the K best
        new_scores = cand_scores / ((cur + 1) ** config.length_penalty)
        if config.early_stopping:
            new_scores = new_scores + is_finished.all(dim=1, keepdim=True).float() * NEG_INF
        new_scores = new_scores + (~improvable).float() * NEG_INF
        just_ended = ended & top_k_mask[None, :]
        new_scores = new_scores + (~just_ended).float() * NEG_INF
        merged_scores = torch.cat([finished_scores, new_scores], dim=1)  # (B, 3K)
        best = merged_scores.topk(K, dim=1).indices
        finished = _gather_beams(torch.cat([finished, candidates], dim=1), best)
        finished_scores = _gather_beams(merged_scores, best)
        is_finished = _gather_beams(torch.cat([is_finished, just_ended], dim=1), best)

        cache.reorder_cache((source_beam + batch_offset).view(-1))

        # stop when no item can improve, or every item has K finished (early stopping), or all ended
        best_live = running_scores[:, :1] / ((cur + 1) ** config.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG_INF)
        improvable = improvable & (best_live > worst_finished).any(dim=1, keepdim=True)
        all_full = bool(is_finished.all()) and config.early_stopping
        if not bool(improvable.any()) or all_full or bool(ended.all()):
            break

    return best_hypotheses(finished, eos)
