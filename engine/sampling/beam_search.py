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


@dataclass
class Beams:
    """B items' beams between tokens: K live and K finished hypotheses each, T tokens long."""

    running: torch.Tensor  # (B, K, T) live beams' tokens
    running_scores: torch.Tensor  # (B, K) sum of log-probs
    finished: torch.Tensor  # (B, K, T) best finished hypotheses
    finished_scores: torch.Tensor  # (B, K)
    is_finished: torch.Tensor  # (B, K) bool: the slot holds a real hypothesis
    improvable: torch.Tensor  # (B, 1) bool: could a live beam still beat the finished?

    @staticmethod
    def fresh_tensors(B: int, K: int, T: int, pad: int, device) -> list[torch.Tensor]:
        """The six tensors of B items before their first token, in field order."""
        running = torch.full((B, K, T), pad, dtype=torch.long, device=device)
        scores = torch.zeros(B, K, device=device)
        scores[:, 1:] = NEG_INF  # all beams start equal: only the first may expand at step 0
        return [running, scores, running.clone(), torch.full((B, K), NEG_INF, device=device),
                torch.zeros(B, K, dtype=torch.bool, device=device), torch.ones(B, 1, dtype=torch.bool, device=device)]

BEAM_FIELDS = ("running", "running_scores", "finished", "finished_scores", "is_finished", "improvable")  # Beams'


def update_beams(beams: Beams, cand_scores: torch.Tensor, cand_index: torch.Tensor, cur: int | torch.Tensor, *,
                 vocab: int, eos: int, config: BeamSearchConfig,
                 top_k_mask: torch.Tensor | None = None) -> tuple[Beams, torch.Tensor, torch.Tensor]:
    """One token of the search from each item's 2K best continuations (scores and flat indices beam * vocab +
    token, each (B, 2K)): the K best that did not end become the live beams, the newly ended among the top K
    enter the finished ones, scored by sum of log-probs / length ** length_penalty. cur: the index of the token
    chosen now, an int or a 0-d tensor (every item at the same index) or (B,) (each item at its own). Returns (the
    new beams, source_beam (B, K): which old beam each live one extends, ended (B, 2K): which candidates ended).
    top_k_mask: (2K,) bool, the first K true, for a caller that keeps it (two kernels fewer a token). The one
    update of the reference, the static-cache and the slot searches."""
    B, K, T = beams.running.shape
    per_item = torch.is_tensor(cur)
    step = cur.view(-1, 1) if per_item else cur  # (1, 1) or (B, 1) as a tensor
    cand_beam, cand_token = cand_index // vocab, cand_index % vocab
    candidates = _gather_beams(beams.running, cand_beam)  # (B, 2K, T)
    if per_item:
        candidates.scatter_(2, step.view(-1, 1, 1).expand(B, 2 * K, 1), cand_token[:, :, None])
    else:
        candidates[:, :, cur] = cand_token
    ended = (cand_token == eos) | (step + 1 >= T)  # (B, 2K)

    # next live beams: the K best candidates that did not end
    live_scores = cand_scores + ended.float() * NEG_INF
    keep = live_scores.topk(K, dim=1).indices  # (B, K)
    running = _gather_beams(candidates, keep)
    running_scores = _gather_beams(live_scores, keep)
    source_beam = _gather_beams(cand_beam, keep)  # (B, K)

    # finished hypotheses: merge the newly ended top-K candidates, keep the K best. An int index scales by a
    # Python float, as Hugging Face does
    length = (step + 1).float() ** config.length_penalty if per_item else (cur + 1) ** config.length_penalty
    new_scores = cand_scores / length
    if config.early_stopping:
        new_scores = new_scores + beams.is_finished.all(dim=1, keepdim=True).float() * NEG_INF
    new_scores = new_scores + (~beams.improvable).float() * NEG_INF
    if top_k_mask is None:
        top_k_mask = torch.arange(2 * K, device=ended.device) < K
    just_ended = ended & top_k_mask[None, :]  # only the top K candidates may finish
    new_scores = new_scores + (~just_ended).float() * NEG_INF
    merged_scores = torch.cat([beams.finished_scores, new_scores], dim=1)  # (B, 3K)
    best = merged_scores.topk(K, dim=1).indices
    finished = _gather_beams(torch.cat([beams.finished, candidates], dim=1), best)
    finished_scores = _gather_beams(merged_scores, best)
    is_finished = _gather_beams(torch.cat([beams.is_finished, just_ended], dim=1), best)

    # could an item's best live beam still beat its worst finished one?
    best_live = running_scores[:, :1] / length
    worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG_INF)
    improvable = beams.improvable & (best_live > worst_finished).any(dim=1, keepdim=True)
    return Beams(running, running_scores, finished, finished_scores, is_finished, improvable), source_beam, ended


@torch.no_grad()
def beam_search(decoder: LatentDecoder, latents: torch.Tensor, config: BeamSearchConfig) -> list[list[int]]:
    """latents (B, *latent_shape) -> for each item, the best hypothesis' token ids (EOS removed)."""
    B, K, T = latents.shape[0], config.num_beams, config.max_new_tokens
    device = latents.device
    eos, pad = decoder.eos_token_id, decoder.pad_token_id

    logits, cache = decoder.prefill(latents.repeat_interleave(K, dim=0))  # every beam starts from the prefix
    beams = Beams(*Beams.fresh_tensors(B, K, T, pad, device))
    batch_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1)

    for cur in range(T):
        if cur > 0:  # feed the token chosen last
            logits, cache = decoder.step(beams.running.view(B * K, T)[:, cur - 1 : cur], cache)
        V = logits.shape[-1]
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B*K, V)
        log_probs = ban_repeated_ngrams(log_probs, beams.running.view(B * K, T)[:, :cur], config.no_repeat_ngram_size)
        scores = (log_probs.view(B, K, V) + beams.running_scores[:, :, None]).view(B, K * V)
        cand_scores, cand_index = scores.topk(2 * K, dim=1)  # (B, 2K)
        beams, source_beam, ended = update_beams(beams, cand_scores, cand_index, cur, vocab=V, eos=eos, config=config)
        cache.reorder_cache((source_beam + batch_offset).view(-1))

        # stop when no item can improve, or every item has K finished (early stopping), or all ended
        all_full = bool(beams.is_finished.all()) and config.early_stopping
        if not bool(beams.improvable.any()) or all_full or bool(ended.all()):
            break

    return best_hypotheses(beams.finished, eos)
