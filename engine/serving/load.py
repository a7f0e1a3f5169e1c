"""A load benchmark in the spirit of vLLM's serving benchmark: many callers against one pipeline, served three
ways in the same run, each request one text with its own seed.

    engine      the callers submit to an AsyncEngine (continuous batching)
    threads     today's way: the callers call `pipe.generate(1, ...)` (or generate_from) on one shared
                pipeline from their own threads (the reference and onnx backends run calls side by side; the
                engine backends take turns)
    serial      today's other way: the same calls one at a time

Closed loop: C callers, each sending its next request when its last returns. Open loop: requests arrive as a
Poisson process of a given rate, whatever the answers (a dispatcher submits; `threads` and `serial` run them on
a pool of 64 threads or of one). Per level: throughput (requests/s), latency p50/p90/p99 from arrival to text,
and for the engine the mean rows per forward and where its time went.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from ldlm.pipeline import Pipeline
from ldlm.serving.engine import AsyncEngine

WAYS = ("engine", "threads", "serial")
MAX_CALLERS = 1024  # closed-loop concurrency
MAX_LOAD_REQUESTS = 100_000


@dataclass(frozen=True)
class LoadSettings:
    """What each request asks (the same for every way) and how many run per level."""

    concurrency: tuple[int, ...] = (1, 2, 8, 32, 64)
    rates: tuple[float, ...] = ()  # open-loop arrivals per second; none: closed loop only
    requests: int = 0  # per level; 0: max(16, 3 x concurrency) (closed) or 32 (open)
    sampler: str = "dpm++2m"
    steps: int = 20
    num_beams: int = 4
    guidance: float | None = None  # conditional models: None is the checkpoint's
    sources: tuple[str, ...] = ()  # a conditional model's requests cycle through these
    ways: tuple[str, ...] = WAYS
    max_rows: int = 64
    decode: str | None = None  # the engine's decode (AsyncEngine); None: its default
    seed: int = 0

    def __post_init__(self) -> None:
        for c in self.concurrency:
            if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= MAX_CALLERS:
                raise ValueError(f"concurrency must be whole numbers from 1 to {MAX_CALLERS}, got {c!r}")
        for r in self.rates:
            if not isinstance(r, (int, float)) or not 0 < r <= 10_000:
                raise ValueError(f"rates must be arrivals per second above 0 and at most 10000, got {r!r}")
        if not 0 <= self.requests <= MAX_LOAD_REQUESTS:
            raise ValueError(f"requests must be from 0 (automatic) to {MAX_LOAD_REQUESTS:,}, got {self.requests}")
        unknown = set(self.ways) - set(WAYS)
        if unknown or not self.ways:
            raise ValueError(f"ways must be some of {list(WAYS)}, got {list(self.ways)}")

    def count(self, concurrency: int | None) -> int:
        if self.requests:
            return self.requests
        return max(16, 3 * concurrency) if concurrency is not None else 32


@dataclass
class LevelResult:
    way: str
    mode: str  # "closed" or "open"
    level: float  # callers, or arrivals per second
    requests: int
    seconds: float
    throughput: float
    p50: float
    p90: float
    p99: float
    mean_rows_per_forward: float | None = None
    engine_seconds: dict = field(default_factory=dict)  # admit / forward / step / decode


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LoadTest:
    """Runs LoadSettings against `pipe`; `results` collects a LevelResult per way and level; `texts` what each way
    answered per request index (to check the engine against lone calls)."""

    def __init__(self, pipe: Pipeline, settings: LoadSettings, progress: bool = True):
        self.pipe, self.settings, self.progress = pipe, settings, progress
        self.results: list[LevelResult] = []
        self.texts: dict[str, dict[int, str]] = {way: {} for way in settings.ways}
        self._index = 0
        self._lock = threading.Lock()
        self.decode: str | None = None  # the engine's decode, once it runs

    def _arguments(self, i: int) -> tuple[str, dict]:
        s = self.settings
        settings = {"seed": s.seed + i, "sampler": s.sampler, "steps": s.steps, "num_beams": s.num_beams}
        if self.pipe.config.condition is None:
            return "generate", settings
        if not s.sources:
            raise ValueError("a conditional model's load test needs sources (LoadSettings.sources)")
        if s.guidance is not None:
            settings["guidance"] = s.guidance
        return "generate_from", {**settings, "source": s.sources[i % len(s.sources)]}

    def lone_call(self, i: int) -> str:
        """Request i as a Pipeline call for one item."""
        task, settings = self._arguments(i)
        if task == "generate":
            return self.pipe.generate(1, progress=False, **settings)[0]
        source = settings.pop("source")
        return self.pipe.generate_from([source], progress=False, **settings)[0]

    def _next(self) -> int:
        with self._lock:
            self._index += 1
            return self._index - 1

    def run(self) -> list[LevelResult]:
        """Every level, each way in turn at that level (so that the ways of a level meet the same machine)."""
        engine = None
        if "engine" in self.settings.ways:
            engine = AsyncEngine(self.pipe, max_rows=self.settings.max_rows, max_queued=10 * MAX_LOAD_REQUESTS,
                                 decode=self.settings.decode)
            self.decode = engine.decode
        try:
            for way in self.settings.ways:
                self._warm(way, engine if way == "engine" else None)
            levels = [("closed", c) for c in self.settings.concurrency] + [("open", r) for r in self.settings.rates]
            total = sum(self.settings.count(int(level) if mode == "closed" else None) for mode, level in levels)
            with tqdm(total=total * len(self.settings.ways), desc="load", unit="request", disable=not self.progress,
                      dynamic_ncols=True) as bar:
                for mode, level in levels:
                    for way in self.settings.ways:
                        bar.set_postfix_str(f"{way}, {mode} loop, {level:g} {'callers' if mode == 'closed' else '/s'}")
                        self._level(way, engine if way == "engine" else None, mode, level)
                        bar.update(self.settings.count(int(level) if mode == "closed" else None))
        finally:
            if engine is not None:
                engine.close()
        return self.results

    def _warm(self, way: str, engine: AsyncEngine | None) -> None:
        """Untimed: a few requests one by one, then a burst of 8 at once (first calls of a shape allocate; a
        compiled backend compiles)."""
        for _ in range(3):
            self._call(way, engine, self._next())
        burst = [threading.Thread(target=self._call, args=(way, engine, self._next())) for _ in range(8)]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
        self.texts[way].clear()

    def _call(self, way: str, engine: AsyncEngine | None, i: int, serial: threading.Lock | None = None) -> str:
        if engine is not None:
            task, settings = self._arguments(i)
            text = engine.submit(task, **settings).result()
        elif serial is not None:
            with serial:
                text = self.lone_call(i)
        else:
            text = self.lone_call(i)
        self.texts[way][i] = text
        return text

    def _level(self, way: str, engine: AsyncEngine | None, mode: str, level: float) -> None:
        n = self.settings.count(int(level) if mode == "closed" else None)
        before = engine.stats() if engine is not None else None
        serial = threading.Lock() if way == "serial" else None
        latencies: list[float] = []
        start = time.perf_counter()
        if mode == "closed":
            remaining = [n]

            def caller() -> None:
                while True:
                    with self._lock:
                        if remaining[0] == 0:
                            return
                        remaining[0] -= 1
                    i = self._next()
                    began = time.perf_counter()
                    self._call(way, engine, i, serial)
                    latencies.append(time.perf_counter() - began)

            threads = [threading.Thread(target=caller) for _ in range(int(level))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            rng = random.Random(self.settings.seed)
            workers = 1 if way == "serial" else 64
            with ThreadPoolExecutor(max_workers=workers if engine is None else 1) as pool:
                futures, arrival = [], start
                for _ in range(n):
                    arrival += rng.expovariate(level)
                    time.sleep(max(0.0, arrival - time.perf_counter()))
                    i = self._next()
                    if engine is not None:
                        task, settings = self._arguments(i)
                        future = engine.submit(task, **settings)
                    else:
                        future = pool.submit(self._call, way, None, i)

                    def done(f, arrived=arrival, i=i) -> None:
                        latencies.append(time.perf_counter() - arrived)
                        if engine is not None:
                            self.texts[way][i] = f.result()

                    future.add_done_callback(done)
                    futures.append(future)
                wait(futures)
        seconds = time.perf_counter() - start
        result = LevelResult(way, mode, level, n, seconds, n / seconds, _percentile(latencies, 0.5),
                             _percentile(latencies, 0.9), _percentile(latencies, 0.99))
        if engine is not None:
            after = engine.stats()
            forwards = after.forwards - before.forwards
            result.engine_seconds = {k: after.seconds[k] - before.seconds[k] for k in after.seconds}
            result.mean_rows_per_forward = (after.forward_rows - before.forward_rows) / forwards if forwards else None
        self.results.append(result)


def identical_share(test: LoadTest, way: str = "engine", sample: int = 32) -> tuple[int, int]:
    """(how many, of up to `sample` requests a way answered, spread over the run, have the text of their lone
    Pipeline call, how many were compared)."""
    answered = sorted(test.texts[way])
    picked = answered[:: max(1, len(answered) // sample)][:sample]
    return sum(test.texts[way][i] == test.lone_call(i) for i in picked), len(picked)


def format_results(results: list[LevelResult]) -> str:
    """A table of the results, with each engine level's throughput against the better of today's two ways."""
    best_today = {}
    for r in results:
        if r.way != "engine":
            key = (r.mode, r.level)
            best_today[key] = max(best_today.get(key, 0.0), r.throughput)
    header = (f"{'way':8} {'mode':6} {'level':>6} {'n':>5} {'req/s':>7} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} "
              f"{'rows/fwd':>8} {'vs today':>8}")
    lines = [header]
    for r in results:
        today = best_today.get((r.mode, r.level))
        ratio = f"{r.throughput / today:.2f}x" if r.way == "engine" and today else ""
        rows = f"{r.mean_rows_per_forward:.1f}" if r.mean_rows_per_forward is not None else ""
        lines.append(f"{r.way:8} {r.mode:6} {r.level:>6g} {r.requests:>5} {r.throughput:>7.2f} {r.p50:>7.3f} "
                     f"{r.p90:>7.3f} {r.p99:>7.3f} {rows:>8} {ratio:>8}")
    return "\n".join(lines)


def results_json(results: list[LevelResult]) -> list[dict]:
    return [asdict(r) for r in results]
