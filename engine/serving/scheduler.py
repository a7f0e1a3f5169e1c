"""The serving loop's iteration, free of threads: admit requests, one reverse-transformer forward over every
active row, each row one step on, and the rows that finished decoded together. The requests admitted in one
iteration encode their source texts as one batch (one encoder call and one projection, each row then cut back to
its own tokens).

The beam decode, two ways (`decode`):
- "continuous": each item joins a running beam search (ldlm.fast.slot_decode) as soon as its latent is ready,
  and every iteration steps every decoding item one token, beside the sampling loop's forward; items leave
  when done, freeing their rows. On the backends with a slot decoder (Pipeline.slot_decoder: reference, onnx,
  aoti); the others decode batch by batch. When nothing else is in flight or queued, the ready items decode
  batch by batch instead (no one would share the iterations, and the batch decode is the faster alone).
- "batched": the items whose latents are ready in the same iteration are decoded as one batch to the end by
  the pipeline's own decode (onnx and aoti with the C bookkeeping; the static-KV search on compiled and the
  engine backends), while the sampling loop waits.
Nucleus requests decode one at a time, each from its own generator, as a lone call does.

By default (decode=None) every backend decodes batch by batch. On the 2-core CPU (bench/results/cpu.md) the
onnx backend served 1.1-1.2x the requests of the continuous decode at 64 callers, 1.4-1.8x at 8 for unguided
requests (even for guided ones), and halved the median latency at 10 requests/s (2026-12-07, "the serving loop
keeps its conditions"); the reference backend 1.3-1.4x at 64 guided callers, 1.4-1.9x unguided, 1.0-1.2x at 8
(2026-12-08, "the reference engine decodes batch by batch too"): an interleaved token step over a few items
costs nearly what a forward costs, and decoding items hold rows the sampling loop could use; the aoti graphs
1.1-1.4x at 8 callers, 1.1-1.3x at 64 (2026-12-08, "the aoti engine decodes batch by batch too").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldlm.fast.slot_decode import SlotBeamSearch
from ldlm.inputs import nonfinite_items
from ldlm.model.reverse import Condition
from ldlm.model.schedule import add_noise
from ldlm.pipeline import DECODE_BATCH, Pipeline
from ldlm.runtimes.backends import ENGINE_BACKENDS
from ldlm.sampling.guidance import encode_condition, projected
from ldlm.sampling.samplers import ItemNoise, randn_like
from ldlm.serving.forward import ConditionRows, forward_inputs
from ldlm.serving.requests import Request
from ldlm.serving.rows import SamplingRow, advance, start_row


@dataclass
class Ticket:
    """A request in flight: `key` is the caller's handle (the engine's future), `submitted` its perf_counter time."""

    request: Request
    key: object
    submitted: float
    row: SamplingRow | None = None
    latent: torch.Tensor | None = None  # (1, *latent_shape) raw, ready to decode
    search: SlotBeamSearch | None = None  # the continuous decode it is in

    @property
    def deadline(self) -> float | None:
        return None if self.request.timeout is None else self.submitted + self.request.timeout


@dataclass
class IterationTimes:
    """Seconds one iteration spent: admitting (encoding texts and conditions), in the forward, stepping the rows,
    decoding."""

    admit: float = 0.0
    forward: float = 0.0
    step: float = 0.0
    decode: float = 0.0
    forward_rows: int = 0


class StepScheduler:
    """The active requests of one pipeline. `iteration(new)` runs one iteration and returns the requests it ended
    as (ticket, text or exception); it never raises for a request's fault."""

    def __init__(self, pipe: Pipeline, decode: str | None = None):
        if decode not in (None, "continuous", "batched"):
            raise ValueError(f"decode must be 'continuous', 'batched' or None (the default), got {decode!r}")
        if decode is None:  # the measured default (module docstring)
            decode = "batched"
        self.pipe = pipe
        self.config = pipe.config
        self.reverse = pipe.step_reverse()
        # a guided row's other half; conditions are projected once, at admission (ldlm.sampling.guidance.projected)
        self.null = projected(self.reverse, self.reverse.null(1)) if self.config.condition is not None else None
        self.conditions = None if self.null is None else ConditionRows(self.null)  # kept across iterations
        # the engine backends step in their dtype; every other backend in float32
        self.dtype = pipe.dtype if pipe.backend in ENGINE_BACKENDS else torch.float32
        self.active: list[Ticket] = []  # in admission order (first come, first served)
        self.decode = decode if decode == "batched" or pipe.slot_decoder() is not None else "batched"
        self._searches: dict = {}  # BeamSearchConfig -> SlotBeamSearch, the continuous decodes

    @property
    def active_rows(self) -> int:
        """Forward rows of the sampling loop."""
        return sum(ticket.row.forward_rows for ticket in self.active if ticket.row is not None)

    @property
    def decoding(self) -> int:
        """Items in the continuous decode."""
        return sum(search.slots for search in self._searches.values())

    def rows_for(self, request: Request) -> int:
        """Forward rows a request will take (0 when it does not sample)."""
        return (2 if request.guided else 1) if request.samples else 0

    @torch.no_grad()
    def iteration(self, new: list[Ticket], drop: Callable[[Ticket], Exception | None],
                  waiting: int = 0) -> tuple[list, IterationTimes]:
        """Admit `new`, drop the active requests for which `drop(ticket)` gives an error (a cancelled or timed-out
        caller: its rows are freed now) and run one iteration; `waiting`: requests queued behind. Returns (ended,
        times); `ended` holds (ticket, text | exception), the dropped included."""
        times = IterationTimes()
        ended = []
        for ticket in self.active:
            error = drop(ticket)
            if error is not None:
                ended.append((ticket, error))
        if ended:
            gone = {id(ticket) for ticket, _ in ended}
            self.active = [ticket for ticket in self.active if id(ticket) not in gone]
            for ticket, _ in ended:
                if ticket.search is not None:
                    ticket.search.remove([ticket])
        start = time.perf_counter()
        conditions = self._source_conditions(new)
        for ticket in new:
            try:
                self._admit(ticket, conditions.get(id(ticket)))
                self.active.append(ticket)
            except Exception as e:  # noqa: BLE001 (a request's own fault: it fails alone)
                ended.append((ticket, e))
        times.admit = time.perf_counter() - start
        sampling = [ticket for ticket in self.active if ticket.row is not None]
        if sampling:
            ended += self._step(sampling, times)
        elif self.conditions is not None:
            self.conditions.clear()  # the rows that left hold no memory while nothing samples
        ready = [ticket for ticket in self.active if ticket.latent is not None]
        if ready or self.decoding:
            start = time.perf_counter()
            # with nothing else in flight or queued, the ready items decode as one batch to the end: the backend's
            # fastest decode (on onnx and aoti its bookkeeping in C), and no one waits behind it
            alone = not self.decoding and not waiting and all(ticket.row is None for ticket in self.active)
            continuous = self.decode == "continuous" and not alone
            ended += self._decode_continuous(ready) if continuous else self._decode(ready)
            times.decode = time.perf_counter() - start
        if ended:
            gone = {id(ticket) for ticket, _ in ended}
            self.active = [ticket for ticket in self.active if id(ticket) not in gone]
        return ended, times

    def _source_conditions(self, tickets: list[Ticket]) -> dict[int, Condition]:
        """The projected conditions of the new requests that sample from a source text, {id(ticket): condition}:
        encoded and projected as one batch (one encoder call, one projection), then cut back to each source's own
        tokens, which is what a lone call encodes, up to float rounding. Empty when fewer than two, or when the
        batch fails: each request then encodes its own in _admit, and only the faulty one fails."""
        wanted = [ticket for ticket in tickets if ticket.request.samples and ticket.request.source is not None]
        if len(wanted) < 2:
            return {}
        try:
            condition = encode_condition(self.pipe.reverse, self.pipe.encoder, device=self.pipe.device,
                                         sources=[ticket.request.source for ticket in wanted])
            condition = projected(self.reverse, condition)
        except Exception:  # noqa: BLE001 (whose fault it was shows when each is encoded alone)
            return {}
        return {id(ticket): condition.rows(slice(i, i + 1)).trimmed() for i, ticket in enumerate(wanted)}

    def _admit(self, ticket: Ticket, condition: Condition | None = None) -> None:
        """A request's starting point, drawn and encoded as the Pipeline call for its single item does;
        `condition`: its source's, already encoded and projected (_source_conditions)."""
        pipe, r = self.pipe, ticket.request
        if r.task == "reconstruct" or (r.task == "vary" and not r.samples):
            ticket.latent = pipe.encode([r.text])
            return
        generator = ItemNoise([r.seed]) if r.item_noise else torch.Generator(device=pipe.device).manual_seed(r.seed)
        if condition is None and (r.source is not None or r.label is not None):
            condition = encode_condition(pipe.reverse, pipe.encoder, device=pipe.device,
                                         sources=None if r.source is None else [r.source],
                                         labels=None if r.label is None else [r.label])
            condition = projected(self.reverse, condition)
        shape = (1, *self.config.latent_shape)
        if r.task == "vary":
            z0 = pipe.normalize(pipe.encode([r.text]))
            noise = randn_like(z0, generator)
            t = torch.full((1,), r.start_t, device=pipe.device, dtype=torch.long)
            x = add_noise(pipe.schedule, z0, t, noise)
        else:
            x = randn_like(torch.empty(shape, device=pipe.device), generator)
            if r.temperature != 1.0:  # as Pipeline._latent_batches scales it
                x = x * r.temperature
        ticket.row = start_row(r, x, generator, condition, self.config.num_timesteps)

    def _forward(self, rows: list[SamplingRow], held: ConditionRows | None) -> list[torch.Tensor]:
        """Each row's x0 estimate from one forward; `held`: the conditions kept across iterations, when `rows` are
        every sampling row (a forward over some of them concatenates theirs)."""
        batch = forward_inputs(rows, self.null, self.config.self_condition, held)
        args = [batch.x.to(self.dtype), batch.t]
        if batch.prev is not None:
            args.append(batch.prev.to(self.dtype))
        kwargs = {} if batch.condition is None else {"condition": batch.condition}
        out = self.reverse(*args, **kwargs).float()
        return batch.estimates(rows, out)

    def _step(self, tickets: list[Ticket], times: IterationTimes) -> list:
        """One forward over every sampling row, then each row's step; a forward that fails is retried request by
        request, so that only the requests whose own forward fails end with its error."""
        ended = []
        rows = [ticket.row for ticket in tickets]
        start = time.perf_counter()
        try:
            estimates = self._forward(rows, self.conditions)
        except Exception:  # noqa: BLE001 (find whose row it was)
            estimates = []
            for ticket in tickets:
                try:
                    estimates.append(self._forward([ticket.row], None))
                except Exception as e:  # noqa: BLE001
                    estimates.append(e)
            for ticket, result in zip(tickets, estimates):
                if isinstance(result, Exception):
                    ended.append((ticket, result))
            tickets = [ticket for ticket, result in zip(tickets, estimates) if not isinstance(result, Exception)]
            estimates = [result[0] for result in estimates if not isinstance(result, Exception)]
            rows = [ticket.row for ticket in tickets]
        times.forward = time.perf_counter() - start
        times.forward_rows = sum(row.forward_rows for row in rows)
        start = time.perf_counter()
        failed = advance(rows, estimates, self.pipe.schedule, self.config.self_condition) if rows else {}
        for i, ticket in enumerate(tickets):
            if i in failed:
                ended.append((ticket, failed[i]))
            elif ticket.row.done:
                ticket.latent = self.pipe.denormalize(ticket.row.x)
                ticket.row = None
        times.step = time.perf_counter() - start
        return ended

    def _text(self, token_ids: list[int]) -> str:
        return self.pipe.decoder.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    def _decode_continuous(self, ready: list[Ticket]) -> list:
        """Every item in a continuous decode one token on, then the ready beam requests join it (nucleus ones
        decode whole, alone)."""
        ended = []
        for config, search in list(self._searches.items()):
            try:
                ended += [(ticket, self._text(ids)) for ticket, ids in search.step()]
            except Exception as e:  # noqa: BLE001 (a decoder failure ends the items decoding together)
                ended += [(ticket, e) for ticket in search.keys]
                del self._searches[config]
        groups: dict = {}
        for ticket in ready:
            groups.setdefault(ticket.request.search if ticket.request.top_p is None else None, []).append(ticket)
        for config, members in groups.items():
            ended += self._decode(members) if config is None else self._join(config, members)
        return ended

    def _join(self, config, tickets: list[Ticket]) -> list:
        """Beam requests of one setting join its running search (created on first use, kept for the next)."""
        latents = torch.cat([ticket.latent for ticket in tickets]).to(self.pipe.device, torch.float32)
        bad = set(nonfinite_items(latents))
        ended = [(tickets[i], ValueError("decode: the latent holds NaN or inf; pass a finite latent")) for i in bad]
        keep = [i for i in range(len(tickets)) if i not in bad]
        if not keep:
            return ended
        if config not in self._searches:
            decoder = self.pipe.decoder
            self._searches[config] = SlotBeamSearch(self.pipe.slot_decoder(), config, n_prefix=self.config.n_prefix,
                                                    eos=decoder.eos_token_id, pad=decoder.pad_token_id,
                                                    device=self.pipe.device)
        search = self._searches[config]
        joining = [tickets[i] for i in keep]
        for ticket in joining:
            ticket.latent, ticket.search = None, search
        try:
            ended += [(ticket, self._text(ids)) for ticket, ids in search.add(latents[keep], joining)]
        except Exception as e:  # noqa: BLE001 (a decoder failure ends the items decoding together)
            inside = {id(ticket) for ticket in search.keys}
            ended += [(ticket, e) for ticket in search.keys + [t for t in joining if id(t) not in inside]]
            del self._searches[config]
        return ended

    def _decode(self, tickets: list[Ticket]) -> list:
        """The ready latents to text: beam requests of equal settings in one batch, nucleus requests one by one."""
        ended = []
        groups: dict = {}
        for ticket in tickets:  # a nucleus request's key is its own: it draws from its own generator
            r = ticket.request
            groups.setdefault(r.search if r.top_p is None else id(ticket), []).append(ticket)
        for members in groups.values():
            search, top_p = members[0].request.search, members[0].request.top_p
            latents = torch.cat([ticket.latent for ticket in members])
            generator = torch.Generator().manual_seed(members[0].request.seed)
            try:
                texts = self.pipe._decode(latents, search, top_p=top_p, generator=generator,
                                          batch_size=DECODE_BATCH, progress=False)
            except Exception as e:  # noqa: BLE001
                if len(members) == 1:
                    ended.append((members[0], e))
                    continue
                ended += self._decode_alone(members, search)
                continue
            ended += list(zip(members, texts))
        return ended

    def _decode_alone(self, tickets: list[Ticket], search) -> list:
        ended = []
        for ticket in tickets:
            try:
                text = self.pipe._decode(ticket.latent, search, top_p=None, generator=torch.Generator(),
                                         batch_size=DECODE_BATCH, progress=False)[0]
                ended.append((ticket, text))
            except Exception as e:  # noqa: BLE001
                ended.append((ticket, e))
        return ended
