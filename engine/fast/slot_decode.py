"""Beam search whose items join and leave between tokens: continuous batching of the decode (ldlm.serving).

Each item holds a slot of K beam rows in one KV cache. An iteration prefills the items that arrived into new
rows (their prefix, once per item, copied to its beams) and chooses their first token, then runs one decoder
step over every other row, each at its own position; items whose search is over (where the reference search
for that item alone would stop) leave, and their rows are dropped. The algorithm and arithmetic per item are
the reference's (ldlm.sampling.beam_search, Hugging Face's vectorized beam search), with a token counter per
slot instead of one per batch; so is every item's text.

The cache (SlotKV) has one write column per step shared by all rows, and a mask per row: a row that joined
later has its prefix in the first columns and holes (masked) up to the column it joined at. GPT-2's positions
are absolute embeddings added at the input, so where a key sits in the cache does not matter; each row's
position is passed with its token. When the columns run out, every row's valid columns are moved to the front
(a row never holds more than prefix + max_new_tokens of them), so memory stays bounded however long it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import torch
import torch.nn.functional as F

from ldlm.fast.static_beam_search import ban_repeated_ngrams_static
from ldlm.model.decoder import LatentDecoder
from ldlm.sampling.beam_search import BEAM_FIELDS, Beams, BeamSearchConfig, best_hypotheses, update_beams


class SlotDecoder(Protocol):
    """What SlotBeamSearch needs of a decoder: rows are added at the end, stepped together, and kept or
    reordered by index."""

    def add(self, latents: torch.Tensor, repeats: int) -> torch.Tensor:
        """Prefill latents (n, *latent_shape) into n * repeats new rows: their next-token logits (n * repeats, V)."""

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row (R,) at each row's position (R,): logits (R, V)."""

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` (R',), in that order (beam reordering, and dropping the rows of finished items)."""


class SlotKV:
    """The rows' keys (L, R, H, hd, C), stored transposed as the ONNX step graph reads them, values (L, R, H, C,
    hd), and mask (R, C) int64 (1: a filled slot): views of the first R rows of buffers that grow by doubling, so
    a row joins, leaves or moves in place. `length` columns are written; the next step writes column `length` of
    every row. gather: a ldlm.kernels.native.RowGather, to move rows in one C call (CPU), else torch's."""

    GROW = 16

    def __init__(self, n_layer: int, n_head: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 gather=None):
        self._keys = torch.zeros(n_layer, 0, n_head, head_dim, self.GROW, dtype=dtype, device=device)
        self._values = torch.zeros(n_layer, 0, n_head, self.GROW, head_dim, dtype=dtype, device=device)
        self._mask = torch.zeros(0, self.GROW, dtype=torch.long, device=device)
        self.rows, self.length, self.gather = 0, 0, gather

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, : self.rows]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, : self.rows]

    @property
    def mask(self) -> torch.Tensor:
        return self._mask[: self.rows]

    @property
    def capacity(self) -> int:
        return self._mask.shape[1]

    def _reserve(self, rows: int, capacity: int) -> None:
        """Buffers of at least `rows` rows and `capacity` columns, the live part kept."""
        L, R_cap, H, hd, C = self._keys.shape
        if rows <= R_cap and capacity <= C:
            return
        R_new, C_new = max(rows, 2 * R_cap) if rows > R_cap else R_cap, max(capacity, C)
        keys = self._keys.new_zeros(L, R_new, H, hd, C_new)
        values = self._values.new_zeros(L, R_new, H, C_new, hd)
        mask = self._mask.new_zeros(R_new, C_new)
        R = self.rows
        keys[:, :R, ..., :C] = self.keys
        values[:, :R, :, :C] = self.values
        mask[:R, :C] = self.mask
        self._keys, self._values, self._mask = keys, values, mask

    def add_rows(self, present: torch.Tensor, repeats: int) -> None:
        """present (L, 2, n, H, P, hd), a prefill's keys and values: each item's copied to `repeats` new rows,
        in the first P columns (the columns after them masked)."""
        L, _, n, H, P, hd = present.shape
        if self.rows == 0:
            self.length = 0
        self.length = max(self.length, P)  # an empty cache, or one only as long as older prefixes
        R, new = self.rows, n * repeats
        self._reserve(R + new, max(self.capacity, P + self.GROW))  # more columns only as steps need them
        keys = self._keys[:, R : R + new, ..., :P].unflatten(1, (n, repeats))  # (L, n, repeats, H, hd, P)
        keys.copy_(present[:, 0].transpose(-1, -2).unsqueeze(2).expand_as(keys))
        values = self._values[:, R : R + new, :, :P].unflatten(1, (n, repeats))  # (L, n, repeats, H, P, hd)
        values.copy_(present[:, 1].unsqueeze(2).expand_as(values))
        self._mask[R : R + new] = 0  # columns after the prefix hold a former row's (finite) values: masked
        self._mask[R : R + new, :P] = 1
        self.rows = R + new

    def make_room(self) -> None:
        """A free column for the next step: compact the rows' valid columns to the front when that frees enough,
        else grow."""
        if self.length < self.capacity:
            return
        longest = int(self.mask.sum(dim=1).max()) if self.rows else 0
        if self.capacity - longest < self.GROW // 2:
            self._reserve(self.rows, self.capacity + self.GROW)
            return
        # each row's filled columns first, in their order (a stable sort of "is empty")
        order = torch.sort((self.mask == 0).to(torch.int8), dim=1, stable=True).indices  # (R, C)
        L, R, H, hd, C = self.keys.shape
        self.keys.copy_(self.keys.gather(4, order[None, :, None, None, :].expand(L, R, H, hd, C)))
        self.values.copy_(self.values.gather(3, order[None, :, None, :, None].expand(L, R, H, C, hd)))
        self.mask.copy_(self.mask.gather(1, order))
        self.length = longest

    def write(self, new_kv: torch.Tensor) -> None:
        """new_kv (L, 2, R, H, hd), this step's keys and values, into column `length`."""
        column = self.length
        self.keys[..., column] = new_kv[:, 0]
        self.values[..., column, :] = new_kv[:, 1]
        self.mask[:, column] = 1
        self.length = column + 1

    def select_rows(self, index: torch.Tensor) -> None:
        """Row r becomes old row index[r], for r < len(index); the rows after leave."""
        R, n = self.rows, len(index)
        if n == R and torch.equal(index, torch.arange(R, device=index.device)):
            return
        if self.gather is not None:  # in place, each moved row copied once; the leaving rows keep themselves
            full = torch.cat([index, torch.arange(n, R, device=index.device)])
            tensors = [*self._keys[:, :R].unbind(0), *self._values[:, :R].unbind(0), self._mask[:R]]
            self.gather(tensors, full)
        else:
            self._keys[:, :n] = self.keys.index_select(1, index)
            self._values[:, :n] = self.values.index_select(1, index)
            self._mask[:n] = self.mask.index_select(0, index)
        self.rows = n


class TorchSlotDecoder:
    """A LatentDecoder's GPT-2 over a SlotKV: the prefill through Hugging Face's forward (as the reference), the
    steps as GPT-2's blocks with each row's own position and key mask."""

    def __init__(self, decoder: LatentDecoder):
        self.decoder, self.gpt2 = decoder, decoder.gpt2
        cfg, param = self.gpt2.config, next(decoder.parameters())
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.kv = SlotKV(cfg.n_layer, self.n_head, self.head_dim, param.dtype, param.device)

    def add(self, latents: torch.Tensor, repeats: int) -> torch.Tensor:
        logits, cache = self.decoder.prefill(latents)
        present = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
        self.kv.add_rows(present, repeats)  # (L, 2, n, H, P, hd)
        return logits.repeat_interleave(repeats, dim=0)

    def step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kv, t = self.kv, self.gpt2.transformer
        kv.make_room()
        R, column = kv.rows, kv.length
        h = (t.wte(input_ids) + t.wpe(positions))[:, None, :]  # (R, 1, E)
        kv.mask[:, column] = 1  # each row attends to its own new key too
        bias = torch.zeros(R, 1, 1, column + 1, dtype=h.dtype, device=h.device).masked_fill_(
            kv.mask[:, None, None, : column + 1] == 0, float("-inf"))  # (R, 1, 1, C')
        for layer, block in enumerate(t.h):
            q, k, v = block.attn.c_attn(block.ln_1(h)).split(h.shape[-1], dim=2)
            q, k, v = (z.view(R, 1, self.n_head, self.head_dim).transpose(1, 2) for z in (q, k, v))  # (R, H, 1, hd)
            kv.keys[layer, :, :, :, column] = k[:, :, 0]
            kv.values[layer, :, :, column, :] = v[:, :, 0]
            keys = kv.keys[layer, :, :, :, : column + 1].transpose(-1, -2)  # (R, H, C', hd)
            attn = F.scaled_dot_product_attention(q, keys, kv.values[layer, :, :, : column + 1], attn_mask=bias)
            h = h + block.attn.c_proj(attn.transpose(1, 2).reshape(R, 1, -1))
            h = h + block.mlp(block.ln_2(h))
        kv.length = column + 1
        return self.gpt2.lm_head(t.ln_f(h[:, 0, :]))

    def select_rows(self, index: torch.Tensor) -> None:
        self.kv.select_rows(index)


@dataclass
class SlotState(Beams):
    """The beams of S slots (K beams, T tokens each), as ldlm.sampling.beam_search keeps them, with a token
    counter per slot."""

    cur: torch.Tensor  # (S,) long: the index of the token each slot chooses next

    @classmethod
    def fresh(cls, slots: int, K: int, T: int, pad: int, device: torch.device) -> SlotState:
        return cls(*Beams.fresh_tensors(slots, K, T, pad, device), torch.zeros(slots, dtype=torch.long, device=device))

    def rows(self, index: torch.Tensor) -> SlotState:
        return SlotState(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def cat(parts: list[SlotState]) -> SlotState:
        return SlotState(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(SlotState)))


def select(state: SlotState, logits: torch.Tensor, config: BeamSearchConfig,
           eos: int) -> tuple[SlotState, torch.Tensor, torch.Tensor]:
    """One token of every slot from its rows' next-token logits (S*K, V): the reference's update with each slot at
    its own token index. Returns (the new state, the cache rows each new beam extends (S*K,), and which slots
    are done: where the reference search for that item alone would stop)."""
    S, K, T = state.running.shape
    V = logits.shape[-1]
    log_probs = F.log_softmax(logits.float(), dim=-1)  # (S*K, V)
    log_probs = ban_repeated_ngrams_static(log_probs, state.running.view(S * K, T), state.cur.repeat_interleave(K),
                                           config.no_repeat_ngram_size)  # each row's own count
    scores = (log_probs.view(S, K, V) + state.running_scores[:, :, None]).view(S, K * V)
    cand_scores, cand_index = scores.topk(2 * K, dim=1)  # (S, 2K)
    new, source_beam, ended = update_beams(state, cand_scores, cand_index, state.cur, vocab=V, eos=eos,
                                           config=config)
    done = ~new.improvable[:, 0] | ended.all(dim=1)
    if config.early_stopping:
        done = done | new.is_finished.all(dim=1)
    rows = (source_beam + torch.arange(S, device=source_beam.device)[:, None] * K).view(-1)
    return SlotState(*(getattr(new, name) for name in BEAM_FIELDS), state.cur + 1), rows, done


class TorchBeams:
    """Every slot's beams in one SlotState, updated by `select`: torch operations on any device."""

    def __init__(self, config: BeamSearchConfig, eos: int, pad: int, device: torch.device):
        self.config, self.eos, self.pad, self.device = config, eos, pad, device
        self.state = SlotState.fresh(0, config.num_beams, config.max_new_tokens, pad, device)

    def add(self, logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n new slots from their prefill logits (n*K, V): their first token chosen. Returns (the rows each new
        beam continues, among the new rows (n*K,), which new slots are done (n,))."""
        state, rows, done = select(SlotState.fresh(n, self.config.num_beams, self.config.max_new_tokens, self.pad,
                                                   self.device), logits, self.config, self.eos)
        self.state = SlotState.cat([self.state, state])
        return rows, done

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot one token on from logits (S*K, V): (rows (S*K,), done (S,))."""
        self.state, rows, done = select(self.state, logits, self.config, self.eos)
        return rows, done

    def last_tokens(self) -> torch.Tensor:
        """The token each row chose last (S*K,)."""
        s, K = self.state, self.config.num_beams
        S, T = s.running.shape[0], s.running.shape[2]
        return s.running.view(S * K, T).gather(1, (s.cur - 1).repeat_interleave(K)[:, None])[:, 0]

    def tokens_chosen(self) -> torch.Tensor:
        """Tokens each slot has chosen (S,)."""
        return self.state.cur

    def results(self, slots: list[int]) -> list[list[int]]:
        return best_hypotheses(self.state.finished[slots], self.eos)

    def keep(self, slots: torch.Tensor) -> None:
        self.state = self.state.rows(slots)


class NativeBeams:
    """One C bookkeeper (ldlm.kernels.native.BeamUpdate, for one item) per slot: the arithmetic of the batched
    decode of the onnx and aoti backends on the CPU, a call per slot and token."""

    def __init__(self, config: BeamSearchConfig, eos: int, pad: int):
        self.config, self.eos, self.pad = config, eos, pad
        self.updates: list = []
        self.cur: list[int] = []  # tokens each slot has chosen

    def add(self, logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from ldlm.kernels.native import BeamUpdate

        c, K = self.config, self.config.num_beams
        rows, done = [], []
        for i in range(n):
            update = BeamUpdate(1, K, c.max_new_tokens, logits.shape[-1], eos=self.eos, pad=self.pad,
                                no_repeat_ngram_size=c.no_repeat_ngram_size, length_penalty=c.length_penalty,
                                early_stopping=c.early_stopping)
            done.append(update(logits[i * K : (i + 1) * K], 0))
            rows.append(update.source_rows + i * K)
            self.updates.append(update)
            self.cur.append(1)
        return torch.cat(rows), torch.tensor(done, dtype=torch.bool)

    def step(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K = self.config.num_beams
        rows, done = [], []
        for s, update in enumerate(self.updates):
            done.append(update(logits[s * K : (s + 1) * K], self.cur[s]))
            rows.append(update.source_rows + s * K)
            self.cur[s] += 1
        return torch.cat(rows), torch.tensor(done, dtype=torch.bool)

    def last_tokens(self) -> torch.Tensor:
        return torch.cat([update.next_tokens for update in self.updates])

    def tokens_chosen(self) -> torch.Tensor:
        return torch.tensor(self.cur, dtype=torch.long)

    def results(self, slots: list[int]) -> list[list[int]]:
        return [best_hypotheses(self.updates[s].finished, self.eos)[0] for s in slots]

    def keep(self, slots: torch.Tensor) -> None:
        kept = slots.tolist()
        self.updates = [self.updates[s] for s in kept]
        self.cur = [self.cur[s] for s in kept]


class SlotBeamSearch:
    """Items that join (`add`) and advance one token per `step`, each finished item leaving with its tokens. The
    bookkeeping is C's per slot where the decoder says so (`decoder.native`, the CPU's onnx and aoti graphs),
    else torch's for all slots at once."""

    def __init__(self, decoder: SlotDecoder, config: BeamSearchConfig, *, n_prefix: int, eos: int, pad: int,
                 device: torch.device):
        from ldlm.kernels.native import MAX_BEAMS

        self.decoder, self.config, self.P, self.eos, self.device = decoder, config, n_prefix, eos, device
        self.keys: list = []  # the caller's handle of each slot
        native = getattr(decoder, "native", False) and config.num_beams <= MAX_BEAMS
        self.beams = NativeBeams(config, eos, pad) if native else TorchBeams(config, eos, pad, device)

    @property
    def slots(self) -> int:
        return len(self.keys)

    @property
    def rows(self) -> int:
        return self.slots * self.config.num_beams

    def add(self, latents: torch.Tensor, keys: list) -> list[tuple[object, list[int]]]:
        """Items (latents (n, *latent_shape)) join: prefilled, their first token chosen. Returns those already
        done (a one-token bound) as (key, token ids)."""
        old_slots, old_rows = self.slots, self.rows
        logits = self.decoder.add(latents, self.config.num_beams)  # (n*K, V), rows old_rows.. appended
        rows, done = self.beams.add(logits, len(keys))
        self.keys += list(keys)
        index = torch.cat([torch.arange(old_rows, device=self.device), rows.to(self.device) + old_rows])
        return self._leave(index, torch.cat([torch.zeros(old_slots, dtype=torch.bool), done.cpu()]))

    def step(self) -> list[tuple[object, list[int]]]:
        """Every slot one token on. Returns the items done, as (key, token ids)."""
        if not self.keys:
            return []
        K = self.config.num_beams
        positions = (self.P + self.beams.tokens_chosen() - 1).repeat_interleave(K)  # each row's token's position
        logits = self.decoder.step(self.beams.last_tokens().to(self.device), positions.to(self.device))
        rows, done = self.beams.step(logits)
        return self._leave(rows.to(self.device), done.cpu())

    def remove(self, keys: list) -> None:
        """Items leave unfinished (their callers gave up); their rows are freed."""
        gone = {id(key) for key in keys}
        done = torch.tensor([id(key) in gone for key in self.keys], dtype=torch.bool)
        if bool(done.any()):
            self._leave(torch.arange(self.rows, device=self.device), done, results=False)

    def _leave(self, rows: torch.Tensor, done: torch.Tensor, results: bool = True) -> list[tuple[object, list[int]]]:
        """Reorder the cache rows to `rows` (S*K,), less the rows of the slots `done` (S,, on the CPU), whose
        results leave."""
        ended = []
        finished = done.nonzero()[:, 0].tolist()
        if finished:
            if results:
                ended = list(zip([self.keys[i] for i in finished], self.beams.results(finished)))
            keep = (~done).nonzero()[:, 0]
            self.keys = [self.keys[i] for i in keep.tolist()]
            self.beams.keep(keep.to(self.device) if isinstance(self.beams, TorchBeams) else keep)
            rows = rows.view(len(done), -1)[keep.to(rows.device)].view(-1)
        self.decoder.select_rows(rows)
        return ended
