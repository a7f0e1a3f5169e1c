"""`ldlm demo`: the embedded default. Trains the `small` preset on text that ships with Python, caches it,
then samples, reconstructs and varies, printing the time each stage took. A second run reuses the cache."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from . import __version__
from .config import ModelConfig
from .data import python_docs_corpus, read_corpus, split_holdout
from .pipeline import load
from .train import TrainConfig, train


def default_cache_dir() -> Path:
    return Path(os.environ.get("LDLM_CACHE", Path.home() / ".cache" / "ldlm"))


def _run_key(texts: list[str], config: ModelConfig, train_config: TrainConfig) -> str:
    digest = hashlib.sha256(json.dumps([__version__, config.to_dict(), vars(train_config)], sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode() + b"\n")
    return digest.hexdigest()[:12]


def _training_done(directory: Path) -> bool:
    state = directory / "training" / "state.json"
    return state.is_file() and json.loads(state.read_text()).get("stage") == "done"


def run_demo(data: list[str] | None = None, cache_dir: str | Path | None = None, time_budget: float = 420.0,
             num_samples: int = 5, progress: bool = True, preset: str = "small") -> dict:
    timings = {}
    start = time.perf_counter()
    texts = read_corpus(data) if data else python_docs_corpus()
    source = ", ".join(data) if data else "Python's own documentation (pydoc topics and stdlib docstrings)"
    config = ModelConfig.from_preset(preset)
    # the decoder gets most of the budget: reconstruction quality bounds everything the demo prints,
    # and the reverse transformer's held-out loss flattens within a few hundred steps
    train_config = TrainConfig(time_budget=time_budget, decoder_share=0.7)
    directory = Path(cache_dir or default_cache_dir()) / f"demo-{preset}-{_run_key(texts, config, train_config)}"
    timings["corpus"] = time.perf_counter() - start
    print(f"corpus: {len(texts)} sentences from {source}")

    start = time.perf_counter()
    if _training_done(directory):
        print(f"model: cached at {directory}")
    else:
        resume = (directory / "training" / "state.json").is_file()
        print(f"model: {'resuming' if resume else 'training'} preset {preset!r} for up to {time_budget:.0f}s -> {directory}")
        train(texts, directory, config, train_config, resume=resume, progress=progress)
    timings["train"] = time.perf_counter() - start

    start = time.perf_counter()
    pipe = load(directory)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    samples = pipe.generate(num_samples, seed=0, progress=progress)
    sampler, steps = pipe.sampling(None, None)
    timings[f"generate {num_samples} ({sampler}, {steps or 1000} steps)"] = time.perf_counter() - start

    _, held_out = split_holdout(texts, train_config.holdout_fraction, seed=train_config.seed)
    examples = held_out[:3]
    start = time.perf_counter()
    reconstructions = pipe.reconstruct(examples, progress=progress)
    timings[f"reconstruct {len(examples)} held-out"] = time.perf_counter() - start

    start = time.perf_counter()
    variations = pipe.vary(examples, strength=0.3, seed=0, progress=progress)
    timings[f"vary {len(examples)} (strength 0.3)"] = time.perf_counter() - start

    print("\nunconditional samples:")
    for text in samples:
        print(f"  - {text}")
    print("\nheld-out sentence -> reconstruction | variation (strength 0.3):")
    for original, rec, var in zip(examples, reconstructions, variations):
        print(f"  > {original}\n    = {rec}\n    ~ {var}")
    print("\ntime per stage:")
    for stage, seconds in timings.items():
        print(f"  {stage:<36} {seconds:8.1f} s")
    return {"samples": samples, "reconstructions": reconstructions, "variations": variations, "timings": timings,
            "checkpoint": str(directory)}
