"""The serving engine (issue 39): many callers over one pipeline, batched at every iteration of the sampling loop.
A request's latent and text must be those of the Pipeline call for its single item, whatever runs beside it."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch

import ldlm
from ldlm.model.config import ModelConfig
from ldlm.serving import AsyncEngine, EngineClosed, EngineOverloaded
from ldlm.serving.scheduler import StepScheduler
from ldlm.training.train import train

from .conftest import TINY_TEXTS, tiny_train_config
from .test_conditional import SOURCES, text_checkpoint  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def self_conditioned_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve-selfcond") / "model"
    train(TINY_TEXTS, out, ModelConfig.from_preset("tiny", self_condition=True),
          tiny_train_config(decoder_steps=10, diffusion_steps=10), progress=False, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def random_decoder():
    """A random tiny decoder: its texts are long and differ from latent to latent (a briefly trained tiny decoder
    says little), so that equal texts mean something."""
    from ldlm.model.decoder import LatentDecoder

    torch.manual_seed(0)
    decoder = LatentDecoder.build(ModelConfig.from_preset("tiny"), TINY_TEXTS).eval()
    for p in decoder.parameters():
        p.data.normal_(0, 0.5)
    for p in decoder.prefix_proj.parameters():  # small differences between latents change the text
        p.data.normal_(0, 4.0)
    return decoder


def with_random_decoder(pipe, decoder):
    pipe.decoder = decoder
    return pipe


@pytest.fixture()
def captured_latents(monkeypatch):
    """Every latent the engine hands to its decode, by request seed and task."""
    latents = {}

    def capturing(decode):
        def capture(self, tickets):
            for ticket in tickets:
                r = ticket.request
                latents[(r.task, r.seed, r.source, r.text)] = ticket.latent.clone()
            return decode(self, tickets)

        return capture

    for name in ("_decode", "_decode_continuous"):
        monkeypatch.setattr(StepScheduler, name, capturing(getattr(StepScheduler, name)))
    return latents


def lone(pipe, task: str, settings: dict) -> tuple[str, torch.Tensor | None]:
    """The Pipeline call for one item: (its text, its latent, None when it does not sample)."""
    s = dict(settings)
    if task == "generate":
        latent = pipe.sample_latents(1, progress=False, **{k: v for k, v in s.items() if k in (
            "seed", "sampler", "steps", "eta", "temperature")})
        return pipe.generate(1, progress=False, **s)[0], latent
    if task == "generate_from":
        source = s.pop("source")
        keys = ("seed", "sampler", "steps", "eta", "guidance", "temperature")
        latent = pipe.sample_latents(1, sources=[source], progress=False, **{k: v for k, v in s.items() if k in keys})
        return pipe.generate_from([source], progress=False, **s)[0], latent
    if task == "vary":
        text, strength = s.pop("text"), s.pop("strength")
        s.pop("num_beams", None)
        if "source" in s:
            s["sources"] = [s.pop("source")]
        return pipe.vary([text], strength, progress=False, **s)[0], pipe.vary_latents([text], strength,
                                                                                     progress=False, **s)
    return pipe.reconstruct([s["text"]], progress=False)[0], None


def staggered(engine: AsyncEngine, requests: list[tuple[str, dict]], every: int = 3) -> list[str]:
    """Submit the requests a few at a time, each group while the earlier ones are mid-loop."""
    futures = []
    for i, (task, settings) in enumerate(requests):
        if i and i % every == 0:
            before = engine.stats().iterations
            deadline = time.time() + 30
            while engine.stats().iterations < before + 2 and time.time() < deadline and not all(
                    f.done() for f in futures):
                time.sleep(0.001)
        futures.append(engine.submit(task, **settings))
    return [f.result(timeout=300) for f in futures]


def assert_lone_results(pipe, requests, texts, captured, atol: float = 1e-5) -> None:
    for (task, settings), text in zip(requests, texts):
        expected_text, expected_latent = lone(pipe, task, settings)
        assert text == expected_text, (task, settings)
        if expected_latent is not None:
            got = captured[(task, settings.get("seed", 0), settings.get("source"), settings.get("text"))]
            torch.testing.assert_close(got, expected_latent, rtol=0, atol=atol)


@pytest.mark.parametrize("decode", ["continuous", "batched"])
def test_staggered_requests_with_mixed_samplers_get_the_lone_calls_results(tiny_checkpoint, random_decoder,
                                                                           captured_latents, decode):
    pipe = with_random_decoder(ldlm.load(tiny_checkpoint), random_decoder)
    requests = [
        ("generate", {"seed": 1, "sampler": "dpm++2m", "steps": 20}),
        ("generate", {"seed": 2, "sampler": "ddim", "steps": 12, "eta": 1.0, "temperature": 0.5}),  # noise each step
        ("generate", {"seed": 3, "sampler": "ddim", "steps": 31}),
        ("generate", {"seed": 4, "sampler": "dpm++2m", "steps": 7, "decoding": "nucleus", "top_p": 0.9}),
        ("vary", {"seed": 5, "text": TINY_TEXTS[0], "strength": 0.04, "sampler": "ddpm"}),  # 40 DDPM steps
        ("reconstruct", {"text": TINY_TEXTS[1]}),
        ("generate", {"seed": 8, "sampler": "dpm++2m", "steps": 9, "num_beams": 2}),
        ("vary", {"seed": 6, "text": TINY_TEXTS[2], "strength": 0.5, "sampler": "dpm++2m", "steps": 10}),
        ("generate", {"seed": 7, "sampler": "ddim", "steps": 12, "eta": 0.5}),
    ]
    with AsyncEngine(pipe, max_rows=8, decode=decode) as engine:
        assert engine.decode == decode
        texts = staggered(engine, requests)
        stats = engine.stats()
    assert stats.completed == len(requests) and stats.failed == 0
    assert stats.mean_rows_per_forward > 1.5  # requests did share forwards
    assert len(set(texts)) >= 3  # texts that differ (the briefly trained model's samples lie close together)
    assert_lone_results(pipe, requests, texts, captured_latents)


def test_guided_unguided_and_unconditional_requests_share_forwards(text_checkpoint, captured_latents):
    pipe = ldlm.load(text_checkpoint)
    requests = [
        ("generate_from", {"source": SOURCES[0], "seed": 1, "guidance": 2.5, "sampler": "dpm++2m", "steps": 12}),
        ("generate", {"seed": 2, "sampler": "ddim", "steps": 15}),  # the null condition
        ("generate_from", {"source": SOURCES[1], "seed": 3, "guidance": 1.0, "sampler": "ddim", "steps": 10,
                           "eta": 1.0}),
        ("generate_from", {"source": SOURCES[2] + " and a much longer source text than the others",
                           "seed": 4, "guidance": 3.0, "sampler": "dpm++2m", "steps": 20}),
        ("generate_from", {"source": SOURCES[3], "seed": 5, "guidance": 0.0, "sampler": "dpm++2m", "steps": 8}),
        ("generate_from", {"source": SOURCES[5], "seed": 7, "guidance": 2.0, "sampler": "dpm++2m", "steps": 8,
                           "temperature": 0.4}),
        ("vary", {"text": TINY_TEXTS[3], "strength": 0.3, "seed": 6, "source": SOURCES[4], "guidance": 2.0,
                  "sampler": "ddim", "steps": 10}),
    ]
    with AsyncEngine(pipe, max_rows=16) as engine:
        texts = staggered(engine, requests, every=2)
        assert engine.stats().mean_rows_per_forward > 2
    assert_lone_results(pipe, requests, texts, captured_latents)


def test_self_conditioning_rows_keep_their_own_previous_estimate(self_conditioned_checkpoint, captured_latents):
    pipe = ldlm.load(self_conditioned_checkpoint)
    requests = [("generate", {"seed": s, "sampler": sampler, "steps": steps})
                for s, sampler, steps in [(1, "dpm++2m", 10), (2, "ddim", 14), (3, "dpm++2m", 6)]]
    with AsyncEngine(pipe) as engine:
        texts = staggered(engine, requests, every=1)
    assert_lone_results(pipe, requests, texts, captured_latents)


@pytest.mark.parametrize(("int8", "decode"), [(False, None), (True, None), (False, "continuous")])
def test_onnx_requests_get_the_lone_calls_results(tiny_checkpoint, tmp_path_factory, int8, decode,
                                                  captured_latents):
    from ldlm.export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("serve-onnx") / "tiny"
    export_checkpoint(tiny_checkpoint, out, variants=("float32",), log=lambda *_: None)
    pipe = ldlm.load(out, onnx_options=ldlm.OnnxOptions(int8_reverse=int8, int8_decoder=int8))
    requests = [("generate", {"seed": s, "sampler": "dpm++2m", "steps": steps}) for s, steps in
                [(1, 20), (2, 12), (3, 20), (4, 5)]] + [("reconstruct", {"text": TINY_TEXTS[5]})]
    with AsyncEngine(pipe, decode=decode) as engine:
        assert engine.decode == (decode or "batched")  # batch by batch unless asked
        texts = staggered(engine, requests, every=2)
    # int8 graphs quantize activations with a scale over the whole batch (ONNX Runtime's dynamic quantization),
    # so a row's int8 result moves with its batch-mates, in the engine as between Pipeline's own batch sizes
    assert_lone_results(pipe, requests, texts, captured_latents, atol=1e-2 if int8 else 1e-5)


def test_compiled_and_fused_backends_serve_the_lone_calls_results(tiny_checkpoint, captured_latents):
    from ldlm.fast.compiled import compiler_missing

    requests = [("generate", {"seed": s, "sampler": "dpm++2m", "steps": 6}) for s in (1, 2, 3)]
    backends = ["fused"] + ([] if compiler_missing() else ["compiled"])
    for backend in backends:
        pipe = ldlm.load(tiny_checkpoint, backend=backend)
        with AsyncEngine(pipe) as engine:  # together: one row bucket (4) for the compiled reverse
            assert engine.decode == "batched"  # the static-KV search keeps its batch to the end
            texts = [f.result(timeout=600) for f in [engine.submit(task, **kw) for task, kw in requests]]
        assert_lone_results(pipe, requests, texts, captured_latents)
        captured_latents.clear()


def test_bad_requests_are_refused_at_submission_naming_the_fix(tiny_pipeline, text_checkpoint):
    with AsyncEngine(tiny_pipeline) as engine:
        for task, settings, message in [
            ("generate", {"seed": -1}, "seed must be"),
            ("generate", {"sampler": "euler"}, "unknown sampler"),
            ("generate", {"steps": 0, "sampler": "ddim"}, "steps must be between"),
            ("generate", {"num_beams": 99}, "from 1 to 32"),
            ("generate", {"source": "x"}, "generate takes no argument source"),
            ("generate_from", {"source": "x"}, "this checkpoint is unconditional"),
            ("reconstruct", {"text": ["a", "b"]}, "one text per request"),
            ("reconstruct", {"text": "  "}, "is empty"),
            ("vary", {"text": "a", "strength": 2}, "strength must be"),
            ("generate", {"temperature": 3}, r"temperature must be a number in \[0, 2\]"),
            ("vary", {"text": "a", "temperature": 0.5}, "vary takes no argument temperature"),
            ("paint", {}, "unknown task"),
        ]:
            with pytest.raises((ValueError, TypeError), match=message):
                engine.submit(task, **settings)
        with pytest.raises(ValueError, match="timeout must be"):
            engine.submit("generate", timeout=-1)
        assert engine.submit("generate", sampler="ddim", steps=3).result(timeout=60) is not None
    with AsyncEngine(ldlm.load(text_checkpoint), max_rows=1) as engine:
        with pytest.raises(ValueError, match="max_rows >= 2"):
            engine.submit("generate_from", source="about cat", guidance=2.0)
        with pytest.raises(ValueError, match="guidance must be a number from 0 to 100"):
            engine.submit("generate_from", source="about cat", guidance=101)
    for bad, message in [({"max_rows": 0}, "max_rows must be a whole number from 1 to 4,096"),
                         ({"max_queued": 10**7}, "max_queued must be a whole number from 1 to 1,000,000"),
                         ({"batch_wait": -1}, "batch_wait must be seconds from 0 to 1"),
                         ({"decode": "greedy"}, "decode must be 'continuous', 'batched' or None")]:
        with pytest.raises(ValueError, match=message):
            AsyncEngine(tiny_pipeline, **bad)


def hold_the_loop(monkeypatch):
    """Make every forward wait for the returned event, so requests pile up while a test looks at the engine."""
    release = threading.Event()
    forward = StepScheduler._forward

    def slow(self, rows, held):
        release.wait(timeout=60)
        return forward(self, rows, held)

    monkeypatch.setattr(StepScheduler, "_forward", slow)
    return release


def test_a_full_queue_refuses_at_once_and_closing_cancels(tiny_pipeline, monkeypatch):
    release = hold_the_loop(monkeypatch)
    engine = AsyncEngine(tiny_pipeline, max_rows=2, max_queued=3)
    running = [engine.submit("generate", seed=s, sampler="ddim", steps=5) for s in range(2)]
    deadline = time.time() + 30
    while engine.stats().active_requests < 2 and time.time() < deadline:
        time.sleep(0.005)
    queued = [engine.submit("generate", seed=s, sampler="ddim", steps=5) for s in range(3)]
    with pytest.raises(EngineOverloaded, match=r"overloaded: 3 queued \(max_queued=3\)"):
        engine.submit("generate", seed=9)
    stats = engine.stats()
    assert (stats.queued, stats.active_rows, stats.rejected) == (3, 2, 1)
    release.set()
    engine.close(cancel=True, timeout=60)
    assert all(f.cancelled() for f in queued)
    assert all(f.cancelled() or f.done() for f in running)
    with pytest.raises(EngineClosed):
        engine.submit("generate")


def test_cancelled_and_timed_out_requests_free_their_rows(tiny_pipeline, monkeypatch):
    release = hold_the_loop(monkeypatch)
    with AsyncEngine(tiny_pipeline, max_rows=2) as engine:
        long = engine.submit("generate", seed=1, sampler="ddim", steps=200)
        late = engine.submit("generate", seed=2, sampler="ddim", steps=200, timeout=0.05)
        waiting = engine.submit("generate", seed=3, sampler="ddim", steps=4)  # no room until a row is freed
        time.sleep(0.1)
        assert long.cancel()
        release.set()
        assert waiting.result(timeout=60) == tiny_pipeline.generate(1, sampler="ddim", steps=4, seed=3,
                                                                    progress=False)[0]
        with pytest.raises(TimeoutError, match=r"timed out after 0.05 s \(at sampling step"):
            late.result(timeout=60)
        stats = engine.stats()
    assert (stats.completed, stats.failed, stats.cancelled, stats.active_rows) == (1, 1, 1, 0)
    with pytest.raises(CancelledError):
        long.result()


def test_a_request_whose_latent_turns_non_finite_fails_alone_naming_the_step(tiny_checkpoint, random_decoder):
    pipe = with_random_decoder(ldlm.load(tiny_checkpoint), random_decoder)
    def poison(module, inputs, out):  # NaN for the rows at t = 832, the second step of a 7-step grid (999, 832,
        t = inputs[1]  # 666, ...), which a 10-step grid (999, 888, 777, ...) never visits
        return torch.where((t == 832)[:, None], torch.full_like(out, float("nan")), out)

    pipe.reverse.register_forward_hook(poison)
    with AsyncEngine(pipe) as engine:
        bad = engine.submit("generate", seed=1, sampler="ddim", steps=7)
        good = [engine.submit("generate", seed=s, sampler="dpm++2m", steps=10) for s in (2, 3)]
        with pytest.raises(FloatingPointError, match=r"non-finite latent at sampling step 1 \(t=832\) in this request"):
            bad.result(timeout=60)
        texts = [f.result(timeout=60) for f in good]
    assert texts == [pipe.generate(1, seed=s, sampler="dpm++2m", steps=10, progress=False)[0] for s in (2, 3)]


def test_sources_admitted_together_are_encoded_as_one_batch_and_a_bad_one_fails_alone(text_checkpoint, monkeypatch,
                                                                                       captured_latents):
    pipe = ldlm.load(text_checkpoint)
    token_states = pipe.encoder.token_states
    batches = []

    def encoder_refusing_poison(texts, *args, **kwargs):
        batches.append(len(texts))
        if any("poison" in text for text in texts):
            raise RuntimeError("poisoned source")
        return token_states(texts, *args, **kwargs)

    monkeypatch.setattr(pipe.encoder, "token_states", encoder_refusing_poison)
    sources = [SOURCES[0], SOURCES[1] + " told at much greater length than the others, with many more tokens",
               SOURCES[2] + " briefly", SOURCES[3]]  # three lengths: the batch is padded, each row cut back
    requests = [("generate_from", {"source": source, "seed": i, "guidance": g, "sampler": "dpm++2m", "steps": 6})
                for i, (source, g) in enumerate(zip(sources, (2.0, 1.0, 3.0, 0.0)))]
    release = hold_the_loop(monkeypatch)
    with AsyncEngine(pipe, max_rows=16) as engine:
        first = engine.submit("generate", seed=9, sampler="ddim", steps=3)  # holds the loop in its first forward
        deadline = time.time() + 30
        while engine.stats().active_requests < 1 and time.time() < deadline:
            time.sleep(0.005)
        batches.clear()
        futures = [engine.submit(task, **settings) for task, settings in requests]
        release.set()  # the four come in together at the next iteration
        first.result(timeout=60)
        texts = [f.result(timeout=60) for f in futures]
        assert batches == [4]  # one encoder call for the four sources

        batches.clear()
        release.clear()
        first = engine.submit("generate", seed=9, sampler="ddim", steps=3)
        deadline = time.time() + 30
        while engine.stats().active_requests < 1 and time.time() < deadline:
            time.sleep(0.005)
        bad = engine.submit("generate_from", source="a poison source", seed=1, sampler="dpm++2m", steps=6)
        good = engine.submit("generate_from", source=SOURCES[4], seed=2, sampler="dpm++2m", steps=6)
        release.set()
        with pytest.raises(RuntimeError, match="poisoned source"):
            bad.result(timeout=60)
        good_text = good.result(timeout=60)
        assert batches == [2, 1, 1]  # the batch failed; then each was encoded alone
    monkeypatch.undo()  # the lone calls below encode with the pipeline's own encoder
    requests.append(("generate_from", {"source": SOURCES[4], "seed": 2, "sampler": "dpm++2m", "steps": 6}))
    assert_lone_results(pipe, requests, texts + [good_text], captured_latents)


def test_asyncio_callers_and_their_cancellation(text_checkpoint):
    pipe = ldlm.load(text_checkpoint)

    async def main():
        async with AsyncEngine(pipe) as engine:
            texts = await asyncio.gather(*(engine.generate_from(SOURCES[i], seed=i, sampler="ddim", steps=6)
                                           for i in range(4)))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(engine.generate(seed=9, sampler="ddim", steps=1000), timeout=0.05)
            for _ in range(200):  # the cancelled caller's row leaves at the next iteration
                if engine.stats().active_rows == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.stats().active_rows == 0 and engine.stats().cancelled == 1
            label = await engine.reconstruct(TINY_TEXTS[0])
            return texts, label

    texts, reconstruction = asyncio.run(main())
    assert texts == [pipe.generate_from([SOURCES[i]], seed=i, sampler="ddim", steps=6, progress=False)[0]
                     for i in range(4)]
    assert reconstruction == pipe.reconstruct([TINY_TEXTS[0]], progress=False)[0]


def test_reranked_requests_keep_the_pipelines_choice_and_cancel_their_candidates(text_checkpoint):
    pipe = ldlm.load(text_checkpoint)
    mr = "name : The Eagle | Type : pub | food : Chinese | area : riverside"
    common = {"sampler": "ddim", "steps": 6, "guidance": 2.0}
    with AsyncEngine(pipe) as engine:
        reranked = [engine.submit("generate_from", source=source, seed=seed, candidates=3, rerank=rerank, **common)
                    for source, seed, rerank in [(mr, 3, "slots"), (SOURCES[0], 4, "mbr")]]
        plain = engine.submit("generate_from", source=SOURCES[1], seed=5, **common)
        texts = [future.result(timeout=120) for future in [*reranked, plain]]
        assert engine.stats().completed == 7  # each candidate is a request of its own
        with pytest.raises(TypeError, match="generate takes no candidates"):
            engine.submit("generate", candidates=2)
        with pytest.raises(ValueError, match="candidates with nucleus decoding"):
            engine.submit("generate_from", source=mr, candidates=2, decoding="nucleus", **common)
        with pytest.raises(ValueError, match="source is not an E2E meaning representation"):
            engine.submit("generate_from", source=SOURCES[0], candidates=2, rerank="slots", **common)
        slow = engine.submit("generate_from", source=mr, seed=1, candidates=4, sampler="ddim", steps=1000)
        assert slow.cancel()
        for _ in range(500):  # its four candidates leave at the next iteration
            if engine.stats().cancelled == 4 and engine.stats().active_rows == 0:
                break
            time.sleep(0.01)
        assert engine.stats().cancelled == 4 and engine.stats().active_rows == 0
    assert texts == [pipe.generate_from([mr], seed=3, candidates=3, rerank="slots", progress=False, **common)[0],
                     pipe.generate_from([SOURCES[0]], seed=4, candidates=3, progress=False, **common)[0],
                     pipe.generate_from([SOURCES[1]], seed=5, progress=False, **common)[0]]


def test_a_two_replica_ray_serve_application_answers_as_lone_calls(tiny_checkpoint, tiny_pipeline):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from ldlm.serving.ray_serve import engine_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             ignore_reinit_error=True)
    try:
        serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy to start (slow on a busy machine)
        handle = serve.run(engine_app(tiny_checkpoint, num_replicas=2, ray_actor_options={"num_cpus": 0.5}),
                           name="ldlm-test", route_prefix=None)
        settings = [{"seed": s, "sampler": "dpm++2m", "steps": 6 + s % 3} for s in range(24)]
        responses = [handle.submit.remote("generate", s) for s in settings]
        answers = [r.result(timeout_s=300) for r in responses]
        assert [a["text"] for a in answers] == [tiny_pipeline.generate(1, progress=False, **s)[0] for s in settings]
        assert len({a["replica"] for a in answers}) == 2  # both replicas served
        with pytest.raises(Exception, match="unknown sampler"):
            handle.submit.remote("generate", {"sampler": "euler"}).result(timeout_s=60)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_load_benchmark_runs_every_way_and_checks_the_engine_against_lone_calls(tiny_checkpoint, tmp_path,
                                                                                   capsys):
    import json

    from ldlm.cli import main

    out = tmp_path / "load.json"
    main(["bench", str(tiny_checkpoint), "--load", "--concurrency", "1", "3", "--rates", "40", "--requests", "6",
          "--steps", "5", "--no-progress", "--decode", "batched", "--json", str(out)])
    table = capsys.readouterr().out
    assert "engine (batched decode) texts identical to their lone Pipeline call" in table
    record = json.loads(out.read_text())
    assert record["decode"] == "batched"  # as asked; the reference's own default is continuous
    rows = {(r["way"], r["mode"], r["level"]) for r in record["results"]}
    assert rows == {(way, mode, level) for way in ("engine", "threads", "serial")
                    for mode, level in (("closed", 1), ("closed", 3), ("open", 40))}
    assert all(r["requests"] == 6 and r["throughput"] > 0 and r["p50"] <= r["p99"] for r in record["results"])
    assert record["parity"]["identical"] == record["parity"]["compared"] > 0  # fp32: every text the lone call's
    assert main(["bench", "--preset", "tiny", "--load"]) == 2
    assert "--load runs a trained model" in capsys.readouterr().err
