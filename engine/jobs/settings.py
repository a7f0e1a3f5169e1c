"""A batch job's settings (what decides its outputs besides each line) and the model's fingerprint, which
both key what a resumed job may continue; the error of an output a job cannot continue or write."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ldlm.evaluation.rerank import check_reranking
from ldlm.inputs import check_temperature
from ldlm.model.model_files import folder_files
from ldlm.sampling.samplers import resolve_sampling


class JobOutputError(ValueError):
    """An output file a job cannot continue or write; the message names the file and what to do."""


@dataclass(frozen=True)
class JobSettings:
    """What decides the outputs besides each item's own fields; hashed to guard `resume`."""

    model: str  # a fingerprint of the checkpoint or export (see model_fingerprint)
    sampler: str | None = None  # None: the checkpoint's default (it is part of the model fingerprint)
    steps: int | None = None
    eta: float = 0.0
    num_beams: int = 4
    dtype: str = "float32"
    seed: int = 0  # the job's seed, from which items without a seed get theirs
    guidance: float | None = None  # lines with a source or label without their own; None: the checkpoint's
    candidates: int = 1  # conditional lines: texts sampled per line, one kept (ldlm.evaluation.rerank)
    rerank: str = "mbr"  # how that one is chosen
    temperature: float = 1.0  # sampled lines' starting noise scale (Pipeline.sample_latents)

    def hash(self) -> str:
        fields = asdict(self)
        if self.candidates == 1:  # without reranking, the hash of the settings before it existed: files resume
            del fields["candidates"], fields["rerank"]
        if self.temperature == 1.0:  # likewise
            del fields["temperature"]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def public(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def resolved_settings(settings: JobSettings, config) -> JobSettings:
    """The settings with the sampler and steps that will run (the checkpoint's defaults filled in, so the output
    records what ran); settings that cannot run fail here, before any work."""
    sampler, steps = resolve_sampling(config, settings.sampler, settings.steps, settings.eta)
    check_reranking(settings.candidates, settings.rerank, [])  # each line's source is checked with the line
    check_temperature(settings.temperature)
    return dataclasses.replace(settings, sampler=sampler, steps=steps)


def model_fingerprint(path: str | Path) -> str:
    """A short hash of everything that decides a model's outputs: an export's manifest (the loader verifies
    every file of the export against the hashes it holds), or every file of a checkpoint but its training
    state (weights included: two checkpoints that differ in any weight differ here)."""
    from ldlm.export.manifest import MANIFEST, is_export

    path = Path(path)
    digest = hashlib.sha256()
    names = [MANIFEST] if is_export(path) else [n for n in folder_files(path) if n.split("/")[0] != "training"]
    for name in names:
        digest.update(name.encode() + b"\0")
        with (path / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
