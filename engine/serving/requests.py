"""One caller's request to the serving engine: what to generate and how, checked in full when submitted (so a bad
argument is the caller's error at once, never a failure inside a shared batch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ldlm.inputs import check_seed, check_strength, check_temperature, check_texts, is_number
from ldlm.sampling.beam_search import BeamSearchConfig
from ldlm.sampling.guidance import check_condition, check_guidance

# what each task takes, as Pipeline's methods of the same name take it for one item
TASK_ARGUMENTS = {
    "generate": {"seed", "sampler", "steps", "eta", "num_beams", "decoding", "top_p", "temperature"},
    "generate_from": {"source", "label", "guidance", "seed", "sampler", "steps", "eta", "num_beams", "decoding",
                      "top_p", "temperature"},
    "vary": {"text", "strength", "seed", "sampler", "steps", "eta", "num_beams", "source", "label", "guidance"},
    "reconstruct": {"text", "num_beams"},
}
MAX_TIMEOUT = 24 * 3600.0  # seconds a request may wait and run


@dataclass(frozen=True)
class Request:
    """A checked request. Its text is what Pipeline gives for the same single item (the `pipe.generate(1, ...)`,
    `generate_from([source], ...)`, `vary([text], ...)` or `reconstruct([text], ...)` call of the same
    arguments), whatever else the engine runs beside it."""

    task: str
    seed: int = 0
    sampler: str | None = None  # resolved: the checkpoint's default when not given (None: no sampling)
    steps: int | None = None
    eta: float = 0.0
    start_t: int | None = None  # vary: the timestep its noised latent starts from
    source: str | None = None
    label: str | None = None
    guidance: float = 1.0
    text: str | None = None  # vary and reconstruct: the text encoded
    strength: float = 0.0
    search: BeamSearchConfig = field(default_factory=BeamSearchConfig)
    top_p: float | None = None  # nucleus sampling's p; None decodes by beam search
    temperature: float = 1.0  # the starting noise's scale (Pipeline.sample_latents)
    timeout: float | None = None  # seconds from submission; past it the request fails and frees its rows
    item_noise: bool = False  # draw as a Pipeline call given seeds=[seed] does (ItemNoise), not seed=seed

    @property
    def samples(self) -> bool:
        """Whether the request runs the sampling loop (reconstruct, and vary at strength 0, only encode and decode)."""
        return self.sampler is not None

    @property
    def guided(self) -> bool:
        """Whether each step reads a conditional and a null row (classifier-free guidance with w not 0 or 1)."""
        return (self.source is not None or self.label is not None) and self.guidance not in (0, 1)


def make_request(pipe, task: str, settings: dict, timeout: float | None = None, *, item_noise: bool = False) -> Request:
    """Check a task's arguments against the pipeline's model, the way Pipeline checks them; raises naming the
    argument and what to pass. item_noise: the request draws as `seeds=[seed]` does (Request.item_noise)."""
    if task not in TASK_ARGUMENTS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASK_ARGUMENTS)}")
    unknown = sorted(set(settings) - TASK_ARGUMENTS[task])
    if unknown:
        raise TypeError(f"{task} takes no argument {', '.join(unknown)}; it takes {sorted(TASK_ARGUMENTS[task])}")
    if timeout is not None and (not is_number(timeout) or math.isnan(timeout) or not 0 < timeout <= MAX_TIMEOUT):
        raise ValueError(f"timeout must be a number of seconds above 0 and at most {MAX_TIMEOUT:g}, or None, "
                         f"got {timeout!r}")
    config = pipe.config
    seed = settings.get("seed", 0)
    check_seed(seed)
    num_beams = settings.get("num_beams", 4)
    common = {"task": task, "seed": seed, "timeout": timeout, "item_noise": item_noise}
    if task == "reconstruct":
        text = _one_text(settings, "text")
        return Request(**common, text=text, search=_beam(pipe, num_beams))

    eta = settings.get("eta", 0.0)
    sampler, steps = pipe.sampling(settings.get("sampler"), settings.get("steps"), eta)
    source, label = settings.get("source"), settings.get("label")
    if task == "generate_from" and source is None and label is None:
        raise ValueError("generate_from needs source=... (or label=... for a class-conditional model)")
    for name, value in (("source", source), ("label", label)):
        if isinstance(value, (list, tuple)):
            raise TypeError(f"{name} is one {name} per request, not a list: submit one request per item")
    check_condition(config, 1, None if source is None else [source], None if label is None else [label])
    guidance = settings.get("guidance")
    guidance = config.guidance if guidance is None else guidance
    check_guidance(guidance)
    conditions = {"source": source, "label": label, "guidance": guidance}
    if task == "vary":
        text = _one_text(settings, "text")
        strength = settings.get("strength", 0.3)
        check_strength(strength)
        start_t = min(config.num_timesteps - 1, round(strength * config.num_timesteps))
        if sampler == "ddpm":
            steps = None  # DDPM runs every timestep from start_t
        return Request(**common, **conditions, text=text, strength=strength, search=_beam(pipe, num_beams), eta=eta,
                       sampler=sampler if strength > 0 else None, steps=steps, start_t=start_t)
    search, top_p = pipe.decoding_settings(settings.get("decoding"), settings.get("top_p"), num_beams)
    if top_p is not None and (not is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    temperature = settings.get("temperature", 1.0)
    check_temperature(temperature)
    return Request(**common, **conditions, sampler=sampler, steps=steps, eta=eta, search=search, top_p=top_p,
                   temperature=temperature)


def _one_text(settings: dict, name: str) -> str:
    text = settings.get(name)
    if text is None:
        raise ValueError(f"pass {name}=... (the text to encode)")
    if isinstance(text, (list, tuple)):
        raise TypeError(f"{name} is one text per request, not a list: submit one request per text")
    check_texts([text])
    return text


def _beam(pipe, num_beams: int) -> BeamSearchConfig:
    return BeamSearchConfig(num_beams=num_beams, max_new_tokens=pipe.config.max_text_tokens)
