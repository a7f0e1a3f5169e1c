"""`ldlm demo`: the embedded default. Trains the `small` preset on text that ships with Python to fixed step
counts (the same model on every machine), caches it, checks it (ldlm.evaluation.self_check), then samples, reconstructs
and varies, printing the time each stage took. A second run reuses the cache."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ldlm import __version__
from ldlm.evaluation.self_check import check_model
from ldlm.inputs import check_positive_int
from ldlm.model.config import ModelConfig
from ldlm.paths import default_cache_dir
from ldlm.pipeline import load
from ldlm.training.data import python_docs_corpus, read_corpus, split_holdout
from ldlm.training.train import TrainConfig, train


def _run_key(texts: list[str], config: ModelConfig, train_config: TrainConfig) -> str:
    digest = hashlib.sha256(json.dumps([__version__, config.to_dict(), vars(train_config)], sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode() + b"\n")
    return digest.hexdigest()[:12]


def _training_done(directory: Path) -> bool:
    state = directory / "training" / "state.json"
    return state.is_file() and json.loads(state.read_text()).get("stage") == "done"


# fixed step counts, not a time budget, so that every machine trains the same model (a slower or busier one
# takes longer): about 8 minutes all told on an idle 2-core CPU (bench/RESULTS.md, "the demo at fixed
# step counts"). The decoder gets most of it: reconstruction quality bounds everything the demo prints, and the
# reverse transformer's held-out loss flattens within a few hundred steps.
DEMO_DECODER_STEPS = 400
DEMO_DIFFUSION_STEPS = 300
SELF_CHECK_TEXTS = 32  # held-out texts reconstructed, and samples checked, by the self-check


def run_demo(data: list[str] | None = None, cache_dir: str | Path | None = None, *,
             decoder_steps: int = DEMO_DECODER_STEPS, diffusion_steps: int = DEMO_DIFFUSION_STEPS,
             num_samples: int = 5, progress: bool = True, preset: str = "small") -> dict:
    check_positive_int(decoder_steps, "decoder_steps (--decoder-steps)")
    check_positive_int(diffusion_steps, "diffusion_steps (--diffusion-steps)")
    timings = {}
    start = time.perf_counter()
    texts = read_corpus(data) if data else python_docs_corpus()
    source = ", ".join(data) if data else "Python's own documentation (pydoc topics and stdlib docstrings)"
    config = ModelConfig.from_preset(preset)
    train_config = TrainConfig(time_budget=None, decoder_steps=decoder_steps, diffusion_steps=diffusion_steps)
    cache = Path(cache_dir or default_cache_dir())
    directory = cache / f"demo-{preset}-{_run_key(texts, config, train_config)}"
    timings["corpus"] = time.perf_counter() - start
    print(f"corpus: {len(texts)} sentences from {source}")

    start = time.perf_counter()
    if _training_done(directory):
        print(f"model: cached at {directory}")
    else:
        resume = (directory / "training" / "state.json").is_file()
        usual = (" (measured at 8 min on an idle 2-core CPU, bench/RESULTS.md; the bars below estimate this "
                 "machine's time)") if (preset, decoder_steps, diffusion_steps) == (
            "small", DEMO_DECODER_STEPS, DEMO_DIFFUSION_STEPS) else ""
        print(f"model: {'resuming' if resume else 'training'} preset {preset!r}, {decoder_steps} decoder and "
              f"{diffusion_steps} diffusion steps{usual} -> {directory}")
        # the encoded corpus is kept beside the demo models, keyed by the encoder and the texts, so a demo
        # with other step counts (or a new ldlm version) encodes nothing again
        train(texts, directory, config, train_config, resume=resume, progress=progress,
              encoding_cache=cache / "encoded")
    timings["train"] = time.perf_counter() - start

    start = time.perf_counter()
    pipe = load(directory)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    drawn = pipe.generate(max(num_samples, SELF_CHECK_TEXTS), seed=0, progress=progress)
    samples = drawn[:num_samples]
    sampler, steps = pipe.sampling(None, None)
    timings[f"generate {len(drawn)} ({sampler}, {steps or 1000} steps)"] = time.perf_counter() - start

    _, held_out = split_holdout(texts, train_config.holdout_fraction, seed=train_config.seed)
    start = time.perf_counter()
    check = check_model(pipe, held_out[:SELF_CHECK_TEXTS], drawn, progress=progress)
    timings[f"self-check ({check.reconstructed} reconstructions)"] = time.perf_counter() - start

    examples = held_out[:3]
    start = time.perf_counter()
    reconstructions = pipe.reconstruct(examples, progress=progress)
    timings[f"reconstruct {len(examples)} held-out"] = time.perf_counter() - start

    start = time.perf_counter()
    variations = pipe.vary(examples, strength=0.3, seed=0, progress=progress)
    timings[f"vary {len(examples)} (strength 0.3)"] = time.perf_counter() - start

    print(f"\n{check.summary()}")
    if check.verdict != "good":
        print(f"  {'To fix' if not check.passed else 'For better text'}: train longer, e.g. `ldlm demo "
              f"--decoder-steps {4 * decoder_steps} --diffusion-steps {2 * diffusion_steps}` (about four times as "
              "long), or train on your own text with `ldlm train`.")
    print("\nunconditional samples:")
    for text in samples:
        print(f"  - {text}")
    print("\nheld-out sentence -> reconstruction | variation (strength 0.3):")
    for original, rec, var in zip(examples, reconstructions, variations):
        print(f"  > {original}\n    = {rec}\n    ~ {var}")
    if not check.passed:
        print("\n(undertrained: see the self-check above)")
    print("\ntime per stage:")
    for stage, seconds in timings.items():
        print(f"  {stage:<36} {seconds:8.1f} s")
    return {"samples": samples, "reconstructions": reconstructions, "variations": variations, "timings": timings,
            "checkpoint": str(directory), "self_check": check}
