"""AsyncEngine: one loaded pipeline serving many callers at once, by continuous (iteration-level) batching.

    engine = ldlm.AsyncEngine(ldlm.load("runs/e2e"))
    text = await engine.generate_from(source="name : Aromi | area : riverside", seed=3)
    future = engine.submit("generate", seed=7)      # from threads without asyncio: a concurrent.futures.Future
    engine.close()

A thread runs the loop (ldlm.serving.scheduler): at each iteration the requests that arrived join, one
reverse-transformer forward steps every active row at its own timestep (Orca's iteration-level scheduling,
vLLM's continuous batching, for a diffusion loop), and the rows that finished are decoded together. A request's
text is the one the Pipeline call for its single item gives, whatever else is in flight.

Under pressure: first come, first served within `max_rows` forward rows (a guided request takes two); at most
`max_queued` requests wait, and one past that is refused at once (EngineOverloaded). A caller that cancels (an
asyncio task cancelled or timed out, Future.cancel()) or whose `timeout` passes frees its rows at the next
iteration. A request that fails (a bad argument at submission, a non-finite latent, its own forward) fails alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

import torch

from ldlm.evaluation.rerank import candidate_seeds, check_reranking, choose
from ldlm.pipeline import Pipeline
from ldlm.serving.requests import make_request
from ldlm.serving.scheduler import IterationTimes, StepScheduler, Ticket

MAX_ROWS = 4096  # forward rows in one iteration
MAX_QUEUED = 1_000_000  # requests waiting (each holds only its arguments until admitted)
LATENCY_WINDOW = 1000  # completed requests the latency percentiles are read over
RATE_WINDOW = 64  # iterations the iteration rate is read over


class EngineOverloaded(RuntimeError):
    """The queue is full: the request was refused at once, nothing of it queued."""


class EngineClosed(RuntimeError):
    """The engine was closed (or its loop stopped on an error, named in the message): it takes no requests."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's counters. Latencies in seconds, from submission to result, over the last
    LATENCY_WINDOW completed requests (None before the first); seconds: time spent per part of the iterations."""

    queued: int
    active_requests: int
    active_rows: int  # forward rows of the sampling loop
    decoding: int  # items in the continuous decode
    iterations: int
    iterations_per_second: float
    forwards: int
    forward_rows: int
    completed: int
    failed: int
    cancelled: int
    rejected: int
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None
    seconds: dict

    @property
    def mean_rows_per_forward(self) -> float:
        return self.forward_rows / self.forwards if self.forwards else 0.0


def _reranked(futures: list[Future], rerank: str, source: str | None) -> Future:
    """A Future of the candidate kept once every one of `futures` is done (ldlm.evaluation.rerank.choose), among
    those that succeeded (it fails only when all did); cancelling it cancels the candidates, freeing their rows."""
    result: Future = Future()
    lock, left = threading.Lock(), [len(futures)]

    def one_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        if not result.set_running_or_notify_cancel():
            return
        kept = [f for f in futures if not f.cancelled() and f.exception() is None]
        if not kept:  # every candidate failed: the first one's error
            first = futures[0]
            result.set_exception(CancelledError() if first.cancelled() else first.exception())
            return
        texts = [f.result() for f in kept]
        result.set_result(texts[choose(texts, rerank, source)])

    def cancel_candidates(done: Future) -> None:
        if done.cancelled():
            for future in futures:
                future.cancel()

    result.add_done_callback(cancel_candidates)
    for future in futures:
        future.add_done_callback(one_done)
    return result


def _check_bound(value, name: str, bound: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
        raise ValueError(f"{name} must be a whole number from 1 to {bound:,}, got {value!r}")


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class AsyncEngine:
    """Serves `pipe` to many callers (module docstring). max_rows: rows in flight (1 to MAX_ROWS; 64 matches the
    pipeline's decode batch): a request holds one forward row while sampling (two when guided), then one
    decoding slot; max_queued: requests that may wait (1 to MAX_QUEUED); decode: "continuous" (items join the
    running beam search between tokens, on the backends with a slot decoder), "batched" (items ready together
    decoded as one batch; ldlm.serving.scheduler), or None: the measured default, "batched"; batch_wait: after
    an iteration that ended requests, the next one waits up to this many seconds for as many new requests to
    arrive, so that callers answered together (a closed loop's) join the same iteration rather than trickle in
    one per iteration (Triton's dynamic batcher has the same knob, max_queue_delay); 0 never waits."""

    def __init__(self, pipe: Pipeline, *, max_rows: int = 64, max_queued: int = 1024, decode: str | None = None,
                 batch_wait: float = 0.002):
        _check_bound(max_rows, "max_rows", MAX_ROWS)
        _check_bound(max_queued, "max_queued", MAX_QUEUED)
        if not isinstance(batch_wait, (int, float)) or isinstance(batch_wait, bool) or not 0 <= batch_wait <= 1:
            raise ValueError(f"batch_wait must be seconds from 0 to 1, got {batch_wait!r}")
        self.pipe, self.max_rows, self.max_queued, self.batch_wait = pipe, max_rows, max_queued, batch_wait
        self._returning = 0  # requests the last iteration ended: their callers may be about to send the next
        self._scheduler = StepScheduler(pipe, decode)
        self.decode = self._scheduler.decode  # what runs: "batched" where the backend has no continuous decode
        self._queue: deque[Ticket] = deque()
        self._lock = threading.Condition()
        self._closing, self._cancel_on_close, self._broken = False, False, None
        self._counts = {"completed": 0, "failed": 0, "cancelled": 0, "rejected": 0}
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._iteration_ends: deque[float] = deque(maxlen=RATE_WINDOW)
        self._iterations, self._forwards, self._forward_rows = 0, 0, 0
        self._seconds = {"admit": 0.0, "forward": 0.0, "step": 0.0, "decode": 0.0}
        self._thread = threading.Thread(target=self._run, name="ldlm-engine", daemon=True)
        self._thread.start()

    # --- callers ----------------------------------------------------------------------------------
    def submit(self, task: str, /, *, timeout: float | None = None, candidates: int = 1, rerank: str = "mbr",
               **settings) -> Future:
        """Queue one request: task "generate", "generate_from", "vary" or "reconstruct", with the arguments of the
        Pipeline method of that name for one item (source=, label=, text= for the item). Thread-safe. Returns a
        Future of the text. Raises at once for a bad argument, EngineOverloaded when max_queued requests wait,
        EngineClosed after close(). candidates, rerank: generate_from's reranking (Pipeline.generate_from): the
        k candidates run as k requests beside the others, and the Future gets the one kept, the text of
        `pipe.generate_from([source], seed=seed, candidates=k, rerank=rerank)`."""
        if candidates == 1:
            requests = [make_request(self.pipe, task, settings, timeout)]
        else:
            if task != "generate_from":
                raise TypeError(f"candidates reranks generate_from's texts; {task} takes no candidates")
            check_reranking(candidates, rerank, None if settings.get("source") is None else [settings["source"]],
                            name="source")
            seeds = candidate_seeds(1, candidates, settings.get("seed", 0), None)
            requests = [make_request(self.pipe, task, {**settings, "seed": s}, timeout, item_noise=True)
                        for s in seeds]
            if requests[0].top_p is not None:
                raise ValueError("candidates with nucleus decoding: Pipeline.generate_from draws every candidate's "
                                 "tokens from one generator, which requests of their own cannot share; pass "
                                 "decoding='beam', or call the Pipeline")
        rows = self._scheduler.rows_for(requests[0])
        if rows > self.max_rows:
            raise ValueError(f"a guided request takes {rows} forward rows, more than this engine's max_rows="
                             f"{self.max_rows}: create the engine with max_rows >= {rows}")
        futures = [Future() for _ in requests]
        with self._lock:
            if self._closing or self._broken:
                raise EngineClosed(self._broken or "the engine is closed: create a new one to submit requests")
            if len(self._queue) + len(requests) > self.max_queued:
                self._counts["rejected"] += 1
                raise EngineOverloaded(f"overloaded: {len(self._queue)} queued (max_queued={self.max_queued}); retry "
                                       "later, or create the engine with a larger max_queued")
            now = time.perf_counter()
            self._queue.extend(Ticket(request, future, now) for request, future in zip(requests, futures))
            self._lock.notify()
        if candidates == 1:
            return futures[0]
        return _reranked(futures, rerank, settings.get("source"))

    async def generate(self, *, timeout: float | None = None, **settings) -> str:
        """One unconditional sample, as `pipe.generate(1, ...)[0]`: seed, sampler, steps, eta, num_beams,
        decoding, top_p, temperature."""
        return await asyncio.wrap_future(self.submit("generate", timeout=timeout, **settings))

    async def generate_from(self, source: str | None = None, *, timeout: float | None = None, **settings) -> str:
        """One text from a source (or label=, for a class-conditional model), as `pipe.generate_from([source],
        ...)[0]`: guidance, seed, sampler, steps, eta, num_beams, decoding, top_p, temperature, and candidates
        with rerank (beam decoding only; submit)."""
        if source is not None:
            settings["source"] = source
        return await asyncio.wrap_future(self.submit("generate_from", timeout=timeout, **settings))

    async def vary(self, text: str, strength: float = 0.3, *, timeout: float | None = None, **settings) -> str:
        """A variation of `text`, as `pipe.vary([text], strength, ...)[0]`."""
        return await asyncio.wrap_future(self.submit("vary", timeout=timeout, text=text, strength=strength,
                                                     **settings))

    async def reconstruct(self, text: str, *, timeout: float | None = None, **settings) -> str:
        """Encode then decode `text`, as `pipe.reconstruct([text], ...)[0]`."""
        return await asyncio.wrap_future(self.submit("reconstruct", timeout=timeout, text=text, **settings))

    def stats(self) -> EngineStats:
        with self._lock:
            ends = list(self._iteration_ends)
            rate = (len(ends) - 1) / (ends[-1] - ends[0]) if len(ends) > 1 and ends[-1] > ends[0] else 0.0
            latencies = list(self._latencies)
            active = list(self._scheduler.active)
            return EngineStats(
                queued=len(self._queue), active_requests=len(active),
                active_rows=sum(t.row.forward_rows for t in active if t.row is not None),
                decoding=sum(1 for t in active if t.search is not None),
                iterations=self._iterations, iterations_per_second=rate, forwards=self._forwards,
                forward_rows=self._forward_rows,
                **self._counts, latency_p50=_percentile(latencies, 0.5), latency_p90=_percentile(latencies, 0.9),
                latency_p99=_percentile(latencies, 0.99), seconds=dict(self._seconds))

    def close(self, *, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests; then finish those queued and in flight (cancel=False), or cancel them (their
        futures raise CancelledError). Waits up to `timeout` seconds (None: until done) for the loop to end."""
        with self._lock:
            self._closing = True
            if cancel:
                for ticket in list(self._queue) + list(self._scheduler.active):
                    ticket.key.cancel()
            self._lock.notify()
        self._thread.join(timeout)

    def __enter__(self) -> AsyncEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.close)

    # --- the loop ---------------------------------------------------------------------------------
    def _admissible(self) -> list[Ticket]:
        """Under the lock: drop queued requests whose caller gave up, then take from the head, first come first
        served, while their rows fit beside the active ones (a request that does not fit waits, and so does
        everything behind it)."""
        kept: deque[Ticket] = deque()
        for ticket in self._queue:
            error = self._dropped(ticket)
            if error is None:
                kept.append(ticket)
            else:
                self._end(ticket, error)
        self._queue = kept
        free = self.max_rows - self._scheduler.active_rows - self._scheduler.decoding
        taken = []
        while self._queue and max(1, self._scheduler.rows_for(self._queue[0].request)) <= free:
            ticket = self._queue.popleft()
            free -= max(1, self._scheduler.rows_for(ticket.request))
            taken.append(ticket)
        return taken

    def _wait_for_returning(self) -> None:
        """Under the lock: after an iteration that ended n requests, wait up to batch_wait for n to be queued (or
        for as many as fit)."""
        fits = self.max_rows - self._scheduler.active_rows - self._scheduler.decoding
        want = min(self._returning, fits)
        self._returning = 0
        if not self.batch_wait or len(self._queue) >= want:
            return
        deadline = time.perf_counter() + self.batch_wait
        while len(self._queue) < want and not self._closing:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._lock.wait(left)

    def _dropped(self, ticket: Ticket) -> Exception | None:
        """Why a request leaves before its end: its caller cancelled it, or its timeout passed."""
        if ticket.key.cancelled():
            return CancelledError()
        if ticket.deadline is not None and time.perf_counter() > ticket.deadline:
            if ticket.row is not None:
                where = f"at sampling step {ticket.row.step} of {len(ticket.row.timesteps)}"
            else:
                where = "while queued" if ticket.latent is None and ticket.search is None else "while decoding"
            return TimeoutError(f"request timed out after {ticket.request.timeout:g} s ({where}); pass a larger "
                                "timeout, or submit fewer requests at once")
        return None

    def _end(self, ticket: Ticket, result) -> None:
        """Under the lock: hand a result (a text or an exception) to its caller, and count it."""
        future: Future = ticket.key
        if isinstance(result, CancelledError) or not future.set_running_or_notify_cancel():
            self._counts["cancelled"] += 1
            return
        if isinstance(result, BaseException):
            self._counts["failed"] += 1
            future.set_exception(result)
            return
        self._counts["completed"] += 1
        self._latencies.append(time.perf_counter() - ticket.submitted)
        future.set_result(result)

    def _record(self, times: IterationTimes) -> None:
        self._iterations += 1
        self._iteration_ends.append(time.perf_counter())
        if times.forward_rows:
            self._forwards += 1
            self._forward_rows += times.forward_rows
        for name in self._seconds:
            self._seconds[name] += getattr(times, name)

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread
        try:
            while True:
                with self._lock:
                    while not self._queue and not self._scheduler.active and not self._closing:
                        self._lock.wait()
                    if self._closing and not self._queue and not self._scheduler.active:
                        return
                    self._wait_for_returning()
                    new = self._admissible()
                    waiting = len(self._queue)
                ended, times = self._scheduler.iteration(new, self._dropped, waiting)
                with self._lock:
                    for ticket, result in ended:
                        self._end(ticket, result)
                    self._returning = len(ended)
                    self._record(times)
        except BaseException as e:  # a fault of the loop itself: every caller hears of it, none waits forever
            with self._lock:
                self._broken = f"the engine's loop stopped: {type(e).__name__}: {e}"
                for ticket in list(self._queue) + list(self._scheduler.active):
                    if ticket.key.set_running_or_notify_cancel():
                        ticket.key.set_exception(EngineClosed(self._broken))
                self._queue.clear()
            raise
