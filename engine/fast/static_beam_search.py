"""Batched beam search on a static KV cache, with no host synchronization per token.

Same algorithm and tokens as the reference (ldlm.sampling.beam_search), restructured for the device:
- the latent prefix is prefilled once per item and copied into its K beam rows;
- every per-token tensor has a fixed shape and the step counter lives on the device, so `decode_step`
  can be captured as a CUDA graph and replayed;
- n-gram bans are computed over all windows (no data-dependent shapes);
- optionally (fused_beam_step) the LM head, log-softmax, ban, beam scores and top-2K are two Triton kernels
  (ldlm.kernels.beam_head) that never write the (rows, vocabulary) logits;
- the stop test is computed on the device every step; once an item batch would have stopped in the
  reference, the state is frozen with `torch.where`, and the host reads the flag only every
  `check_every` steps to leave the loop early;
- the KV cache is double-buffered (ldlm.fast.static_gpt2), so step s reads cache s % 2: on GPU, two captured
  graphs of the decode step, replayed alternately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldlm.fast.static_gpt2 import StaticKVGPT2
from ldlm.model.decoder import LatentDecoder
from ldlm.sampling.beam_search import BEAM_FIELDS, NEG_INF, Beams, BeamSearchConfig, best_hypotheses, update_beams


def _ngram_windows(tokens: torch.Tensor, cur: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(matches, next_tokens), each (R, T - n + 1): whether each window's first n-1 tokens are the last n-1
    generated, and the token that completed it; None without a ban. tokens: (R, T) buffer whose first `cur`
    entries are real: cur a 0-d device tensor (every row's count), or (R,) (each row's own, as the slot search
    keeps them). Static shapes: every window is compared, those not yet complete never match."""
    R, T = tokens.shape
    if n <= 0 or T < n:
        return None
    windows = tokens.unfold(1, n, 1)  # (R, T-n+1, n)
    count = cur.view(-1, 1)  # (1, 1) or (R, 1)
    starts = torch.arange(T - n + 1, device=tokens.device)
    complete = starts + n <= count  # (1 or R, T-n+1) windows fully inside the generated tokens
    if n == 1:
        matches = complete.expand(R, -1)
    else:
        last = (count - (n - 1) + torch.arange(n - 1, device=tokens.device)).clamp(min=0)  # (1 or R, n-1) positions
        prefix = tokens.gather(1, last.expand(R, -1))  # (R, n-1) the last n-1 generated tokens
        matches = (windows[:, :, :-1] == prefix[:, None, :]).all(dim=-1) & complete  # (R, T-n+1)
    return matches, windows[:, :, -1]


def ban_repeated_ngrams_static(log_probs: torch.Tensor, tokens: torch.Tensor, cur: torch.Tensor, n: int) -> torch.Tensor:
    """Static-shape n-gram ban: log_probs (R, V) with every token that would repeat an n-gram at -inf (cur as
    _ngram_windows takes it)."""
    found = _ngram_windows(tokens, cur, n)
    if found is None:
        return log_probs
    matches, next_tokens = found
    counts = torch.zeros_like(log_probs).scatter_add_(1, next_tokens, matches.to(log_probs.dtype))
    return log_probs.masked_fill(counts > 0, float("-inf"))


def banned_tokens_static(tokens: torch.Tensor, cur: torch.Tensor, n: int) -> torch.Tensor:
    """The same ban as token ids, no (R, V) tensor: (R, W) ids each row may not choose next, -1 for none (W = T - n
    + 1 windows; 0 without a ban), as ldlm.kernels.beam_head takes them."""
    found = _ngram_windows(tokens, cur, n)
    if found is None:
        return tokens.new_empty(tokens.shape[0], 0)
    matches, next_tokens = found
    return torch.where(matches, next_tokens, -1)


@dataclass
class BeamState(Beams):
    """Everything that changes per token, in fixed-shape device tensors (B items, K beams, T tokens): the beams
    and the step."""

    active: torch.Tensor  # () bool: false once the reference would have stopped
    cur: torch.Tensor  # () long: index of the token chosen this step


class StaticBeamSearch:
    """Beam search for up to `batch_size` latents with a static KV cache; reuse it across calls."""

    def __init__(self, decoder: LatentDecoder, batch_size: int, config: BeamSearchConfig, check_every: int = 8,
                 graphs: bool = False, fused_norms: bool | None = None, attention: str | None = None,
                 fused_blocks: bool = False, fused_beam_step: bool = False):
        """check_every: tokens between the host's checks for all-finished; graphs: capture the decode step as
        CUDA graphs; fused_norms: residual adds fused with the layer norms after them in Triton kernels
        (default: on CUDA; Triton's CPU interpreter runs them far slower than torch); attention: a step's one-query
        attention, "sdpa" (the default), "matmul" or "indirect" (ldlm.fast.static_gpt2); fused_blocks: a step's every
        matmul one Triton kernel with its layer norm, bias, GELU and residual (off until a GPU run times it);
        fused_beam_step: a decode step's LM head, log-softmax, n-gram ban, beam scores and top-2K as two Triton
        kernels (ldlm.kernels.beam_head; the LM head module's forward hooks do not run; off until a GPU run
        times it). The prefill's selection, once per call, stays torch's."""
        self.decoder, self.config, self.check_every, self.graphs = decoder, config, check_every, graphs
        self.B, self.K, self.T = batch_size, config.num_beams, config.max_new_tokens
        self.P = decoder.config.n_prefix
        if fused_norms is None:
            fused_norms = next(decoder.parameters()).is_cuda
        self.model = StaticKVGPT2(decoder.gpt2, rows=self.B * self.K, max_len=self.P + self.T, fused_norms=fused_norms,
                                  attention=attention, fused_blocks=fused_blocks)
        self.device = self.model.k_cache.device
        if fused_beam_step:
            head = decoder.gpt2.lm_head
            if head._forward_hooks or head._forward_pre_hooks:
                raise ValueError("fused_beam_step reads the LM head's weight, so the forward hooks on it would not "
                                 "run: remove them, or leave fused_beam_step off")
            from ldlm.kernels.beam_head import beam_head_topk

            self._beam_head = beam_head_topk  # (h, norm, head, running, banned, *, candidates) -> top-2K
        self.fused_beam_step = fused_beam_step
        self.eos, self.pad = decoder.eos_token_id, decoder.pad_token_id
        self.top_k_mask = torch.arange(2 * self.K, device=self.device) < self.K
        self.batch_offset = torch.arange(self.B, device=self.device)[:, None] * self.K
        self.identity_rows = torch.arange(self.B * self.K, device=self.device)  # cache order kept once frozen
        B, K, T, dev = self.B, self.K, self.T, self.device
        tokens = torch.empty((B, K, T), dtype=torch.long, device=dev)
        self.state = BeamState(  # one persistent state: a captured graph reads and writes these very tensors
            tokens, torch.empty(B, K, device=dev), torch.empty_like(tokens), torch.empty(B, K, device=dev),
            torch.empty(B, K, dtype=torch.bool, device=dev), torch.empty(B, 1, dtype=torch.bool, device=dev),
            torch.empty((), dtype=torch.bool, device=dev), torch.empty((), dtype=torch.long, device=dev))
        dtype = next(decoder.parameters()).dtype
        self.latents = torch.zeros(B, *decoder.config.latent_shape, device=dev, dtype=dtype)  # static input
        self._graphs: list[torch.cuda.CUDAGraph] = []  # on GPU: the decode step that reads cache 0, and cache 1

    def _reset(self) -> BeamState:
        s = self.state
        s.running.fill_(self.pad)
        s.running_scores.zero_()
        s.running_scores[:, 1:] = NEG_INF  # all beams start equal: only the first may expand at step 0
        s.finished.fill_(self.pad)
        s.finished_scores.fill_(NEG_INF)
        s.is_finished.zero_()
        s.improvable.fill_(True)
        s.active.fill_(True)
        s.cur.zero_()
        return s

    def _candidates(self, s: BeamState, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each item's 2K best (beam, token) continuations from next-token logits (B*K, V): scores (B, 2K) and
        flat indices beam * V + token (B, 2K)."""
        B, K, T = self.B, self.K, self.T
        V = logits.shape[-1]
        log_probs = F.log_softmax(logits.float(), dim=-1)
        log_probs = ban_repeated_ngrams_static(log_probs, s.running.view(B * K, T), s.cur,
                                               self.config.no_repeat_ngram_size)
        scores = (log_probs.view(B, K, V) + s.running_scores[:, :, None]).view(B, K * V)
        return scores.topk(2 * K, dim=1)  # (B, 2K)

    def _fused_candidates(self, s: BeamState, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """_candidates from the last layer's output (B*K, E), before ln_f: ldlm.kernels.beam_head's two kernels."""
        banned = banned_tokens_static(s.running.view(self.B * self.K, self.T), s.cur, self.config.no_repeat_ngram_size)
        gpt2 = self.model.gpt2
        return self._beam_head(hidden, gpt2.transformer.ln_f, gpt2.lm_head, s.running_scores, banned,
                               candidates=2 * self.K)

    def _select(self, s: BeamState, cand_scores: torch.Tensor, cand_index: torch.Tensor) -> None:
        """One beam update from the items' 2K best continuations (scores and beam * V + token, each (B, 2K)), in
        place on `s`; the cache is reordered to match."""
        new, source_beam, ended = update_beams(s, cand_scores, cand_index, s.cur, eos=self.eos, config=self.config,
                                               vocab=self.model.gpt2.lm_head.out_features, top_k_mask=self.top_k_mask)
        stop = ~new.improvable.any() | ended.all()
        if self.config.early_stopping:
            stop = stop | new.is_finished.all()

        # commit only while active: after the reference's stopping step the state stays frozen
        a = s.active
        for name in BEAM_FIELDS:  # names, not dataclasses.fields: torch.compile traces this loop
            kept = getattr(s, name)
            torch.where(a, getattr(new, name), kept, out=kept)  # in place: one kernel, not a where and a copy
        self.model.reorder(torch.where(a, (source_beam + self.batch_offset).view(-1), self.identity_rows))
        torch.logical_and(a, ~stop, out=s.active)
        s.cur.add_(1)

    def decode_step(self, s: BeamState) -> None:
        """Feed the tokens chosen last step, then select: static shapes, device counter (graph-capturable)."""
        last = s.running.view(self.B * self.K, self.T).gather(1, (s.cur - 1).view(1, 1).expand(self.B * self.K, 1))
        if self.fused_beam_step:
            hidden = self.model.step(last.view(-1), self.P + s.cur - 1, head=False)  # (B*K, E) before ln_f
            self._select(s, *self._fused_candidates(s, hidden))
        else:
            self._select(s, *self._candidates(s, self.model.step(last.view(-1), self.P + s.cur - 1)))

    def _prefill(self) -> BeamState:
        s = self._reset()
        logits = self.model.prefill(self.decoder.prefix(self.latents), repeats=self.K)  # (B, V) once per item
        self._select(s, *self._candidates(s, logits.repeat_interleave(self.K, dim=0)))
        return s

    def _capture(self) -> None:
        """Capture decode_step as two CUDA graphs, one per cache it reads, after a warm-up on a side stream."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            s = self._prefill()
            for _ in range(2):
                self.decode_step(s)
        torch.cuda.current_stream().wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()  # never replayed at once, nothing outlives a replay: one pool
        for parity in (0, 1):
            self.model.current = parity
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):  # as ldlm.fast.fused_sampler's
                self.decode_step(self.state)
            self._graphs.append(graph)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> list[list[int]]:
        """latents (b, *latent_shape) with b <= batch_size -> best token ids per item (EOS removed)."""
        b = latents.shape[0]
        if b > self.B:
            raise ValueError(f"batch of {b} exceeds this searcher's batch_size {self.B}")
        # pad to the static batch with copies of item 0: they stop when item 0 does, so results are unchanged
        self.latents[:b].copy_(latents)
        self.latents[b:].copy_(latents[:1].expand(self.B - b, *latents.shape[1:]))
        if self.graphs and not self._graphs:
            self._capture()
        s = self._prefill()  # leaves cache 1 current: step 1 reads it, step 2 cache 0, ...
        for step in range(1, self.T):
            if step % self.check_every == 0 and not bool(s.active):  # the only host syncs of the loop
                break
            if self._graphs:
                self._graphs[step % 2].replay()
            else:
                self.decode_step(s)
        return best_hypotheses(s.finished[:b], self.eos)
