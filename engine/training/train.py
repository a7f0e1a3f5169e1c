"""Training, in two stages on latents of the frozen encoder.

Stage 1 ("decoder"): GPT-2 learns to reconstruct each text from its clean latent (cross-entropy).
Stage 2 ("diffusion"): the reverse transformer learns x0 from x_t = add_noise(x0, t, noise), t ~ U{0..T-1},
with MSE to the clean normalized latent and Adam at lr 1e-4 (the design).

The output directory is a loadable checkpoint at every save; `training/` inside it holds what `--resume`
needs (step counters, optimizer and RNG state, the latent cache, a JSONL log)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from ldlm.inputs import check_seed
from ldlm.model.checkpoint import Components, load_checkpoint, save_checkpoint
from ldlm.model.config import (DECODER_FIELDS, DEFAULT_ENCODER, ENCODER_FIELDS, REVERSE_FIELDS, TRAINING_PRECISIONS,
                               ModelConfig)
from ldlm.model.decoder import LatentDecoder
from ldlm.model.encoder import LatentEncoder, build_tiny_encoder, pad_states
from ldlm.model.model_files import is_hub_id
from ldlm.model.resampler import LatentResampler
from ldlm.model.reverse import ReverseTransformer
from ldlm.model.schedule import NoiseSchedule, add_noise
from ldlm.training.data import holdout_indices
from ldlm.training.encodings import EncodedCorpus
from ldlm.training.out_folder import check_training_out, training_lock
from ldlm.training.train_conditions import TrainingConditions
from ldlm.training.train_state import load_optimizer, save_optimizer

STAGES = ("decoder", "diffusion")
HOLDOUT_BY = ("line", "source")  # TrainConfig.holdout_by

LATENTS_PER_DIFFUSION_STEP = 256  # the design's stage-2 batch, in latent vectors


@dataclass
class TrainConfig:
    time_budget: float | None = 600.0  # seconds for both stages together; None: only the step limits apply
    decoder_share: float = 0.5  # fraction of the time budget for stage 1 (stage 2 also gets what stage 1 left)
    decoder_steps: int | None = None  # stage 1 step limit
    diffusion_steps: int | None = None  # stage 2 step limit
    decoder_batch_size: int = 64
    # None: 256 latent vectors a step, i.e. 256 texts with one latent, 256 // K with K latent tokens, so that K
    # costs no more per step and gets the design's number of steps (E2E, bench/RESULTS.md)
    diffusion_batch_size: int | None = None
    decoder_lr: float = 5e-4  # AdamW; warm-up, then cosine decay to 10% over the stage's step or time budget
    diffusion_lr: float = 1e-4  # Adam, constant (the design)
    warmup_steps: int = 100
    eval_every: int = 200  # steps between held-out evaluations
    save_every: float = 300.0  # seconds between checkpoints
    holdout_fraction: float = 0.02  # share of the data held out for validation loss (at most 500 lines)
    # "line": held-out lines drawn at random; "source": every line of some source texts (a conditional model's),
    # so the validation loss is that of sources never trained on, what generate_from meets
    holdout_by: str = "line"
    ema_decay: float | None = None  # keep an EMA of the reverse transformer (served and validated); None: off
    decoder_noise: float = 0.0  # stage 1 trains on latents + N(0, (decoder_noise * latent_std)^2): robust decoding
    # a conditional model (ModelConfig.condition): the share of stage-2 rows whose condition is replaced by the
    # learned null condition, so one model learns both branches of classifier-free guidance
    condition_dropout: float = 0.1
    decoder_from: str | None = None  # reuse this checkpoint's trained decoder and tokenizer: stage 1 is skipped
    reverse_from: str | None = None  # reuse this checkpoint's reverse transformer and latent statistics: stage 2 is skipped
    seed: int = 0
    # where the models train, e.g. "cuda"; batches, timesteps and noise are drawn on the CPU by one seeded
    # generator, so a run sees the same data on any device and --resume may move it to another
    device: str = "cpu"
    precision: str = "fp32"  # "bf16": matmuls autocast to bfloat16; weights, optimizer state and losses stay fp32

    def __post_init__(self) -> None:
        if self.time_budget is None and ((self.decoder_steps is None and self.decoder_from is None)
                                         or (self.diffusion_steps is None and self.reverse_from is None)):
            raise ValueError("give a time budget, or step limits for each stage that is trained")
        if not 0.0 < self.decoder_share < 1.0:
            raise ValueError(f"decoder_share must be in (0, 1), got {self.decoder_share}")
        check_precision(self.precision)
        check_seed(self.seed)
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {self.condition_dropout}")
        if self.holdout_by not in HOLDOUT_BY:
            raise ValueError(f"holdout_by must be one of {list(HOLDOUT_BY)}, got {self.holdout_by!r}")


def _time_left(step: int, elapsed: float, step_time: float, max_steps: int | None,
               max_seconds: float | None) -> str:
    """The time a stage has left, by whichever of its limits comes first, for the progress bar (which shows
    its own estimate only for a step limit)."""
    left = [s for s in ((max_steps - step) * step_time if max_steps else None,
                        max_seconds - elapsed if max_seconds else None) if s is not None]
    seconds = max(0.0, min(left)) if left else 0.0
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _holdout_groups(model_config: ModelConfig, train_config: TrainConfig,
                    conditions: list[str] | None) -> list[str] | None:
    """The group key of each line for TrainConfig.holdout_by, or None to hold out lines at random."""
    if train_config.holdout_by == "line":
        return None
    if model_config.condition != "text" or conditions is None:
        raise ValueError("holdout_by='source' holds out every line of some source texts: it needs a model "
                         "conditioned on text (--source-field); drop --holdout-by source")
    return conditions


def _fingerprint(texts: list[str], encoder_name: str | None, conditions: list[str] | None = None) -> str:
    digest = hashlib.sha256(str(encoder_name).encode())
    for text in texts:
        digest.update(text.encode() + b"\n")
    for condition in conditions or []:  # none for an unconditional model: its fingerprint is as before
        digest.update(b"\x00" + condition.encode() + b"\n")
    return digest.hexdigest()[:16]


def training_device(name: str) -> torch.device:
    """`name` as a torch device, checked to be usable here (so a missing GPU fails before any work)."""
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # AssertionError: "Torch not compiled with CUDA enabled"
        raise ValueError(f"cannot train on device {name!r} ({e}): pick one this machine has, e.g. --device cpu") from e
    return device


def check_precision(precision: str) -> str:
    if precision not in TRAINING_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(TRAINING_PRECISIONS)}, got {precision!r}")
    return precision


def autocast(device: torch.device, precision: str):
    """The context the forward passes and losses run in: bf16 autocast, or plain fp32 (`precision` as checked
    by check_precision)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def warmup_cosine(step: int, done: float, warmup_steps: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine from 1 to 0.1 as `done` goes from 0 to 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done)))


def build_components(config: ModelConfig, texts: list[str], seed: int = 0, log=print,
                     reused: dict[str, Components] | None = None) -> Components:
    """Fresh models for `config`: the encoder (pretrained, or a tiny one built in code), a GPT-2 decoder whose
    tokenizer is trained on `texts`, a randomly initialized reverse transformer; identity latent statistics.
    `reused` maps a stage ("decoder", "diffusion") to a trained checkpoint whose part (and encoder) is taken as is."""
    reused = reused or {}
    source = next(iter(reused.values()), None)
    if source is not None:  # a reused part only makes sense in its own latent space: take the encoder along
        encoder, bundled = source.encoder, source.encoder_bundled
    elif config.encoder is None:
        encoder, bundled = build_tiny_encoder(config.latent_dim, seed=seed, max_tokens=config.encoder_max_tokens), True
    else:  # named by the user who trains: fetched from the hub if need be. A local folder travels inside the
        # checkpoint (a checkpoint reads nothing outside its folder); the default and hub ids are named by id
        encoder = LatentEncoder.from_pretrained(config.encoder, config.encoder_max_tokens, download=True)
        bundled = config.encoder != DEFAULT_ENCODER and not is_hub_id(config.encoder)
    if encoder.latent_dim != config.latent_dim:
        config = dataclasses.replace(config, latent_dim=encoder.latent_dim)
        log(f"latent_dim set to the encoder's hidden size, {encoder.latent_dim}")
    with torch.random.fork_rng():  # each part seeded on its own, so reusing one leaves the other's init unchanged
        if config.latent_tokens > 1 and source is None:
            torch.manual_seed(seed + 2)
            encoder.resampler = LatentResampler(config)
        torch.manual_seed(seed)
        decoder = reused["decoder"].decoder if "decoder" in reused else LatentDecoder.build(config, texts)
        torch.manual_seed(seed + 1)
        reverse = reused["diffusion"].reverse if "diffusion" in reused else ReverseTransformer(config)
    mean, std = torch.zeros(config.latent_shape), torch.ones(config.latent_shape)
    if "diffusion" in reused:  # the reverse transformer was trained in its checkpoint's normalization
        mean, std = reused["diffusion"].latent_mean, reused["diffusion"].latent_std
    return Components(config, encoder, decoder, reverse, mean, std, encoder_bundled=bundled)


def load_reused_parts(config: ModelConfig, train_config: TrainConfig) -> tuple[ModelConfig, dict[str, Components]]:
    """The checkpoints named by `decoder_from` / `reverse_from`, and `config` with those parts' fields taken from
    them. They must share one encoder, since each part is tied to the latent space it was trained in."""
    reused, encoder_of = {}, {}
    for stage, path, fields in (("decoder", train_config.decoder_from, DECODER_FIELDS),
                                ("diffusion", train_config.reverse_from, REVERSE_FIELDS)):
        if path is None:
            continue
        source = load_checkpoint(path)
        encoder_of[path] = {f: getattr(source.config, f) for f in ENCODER_FIELDS}
        config = dataclasses.replace(config, **{f: getattr(source.config, f) for f in fields})
        reused[stage] = source
    if len({json.dumps(e, sort_keys=True) for e in encoder_of.values()}) > 1:
        raise ValueError(f"the reused checkpoints were trained on different encoders ({encoder_of}): "
                         "combine parts trained with the same encoder")
    if "diffusion" in reused and reused["diffusion"].config.latent_tokens > 1:
        # the resampler is trained with the decoder: the reverse transformer only fits the resampler it saw
        resampler = reused["diffusion"].encoder.resampler.state_dict()
        other = reused["decoder"].encoder.resampler.state_dict() if "decoder" in reused else None
        if other is None or any(not torch.equal(resampler[k], other[k]) for k in resampler):
            raise ValueError(f"{train_config.reverse_from} has {reused['diffusion'].config.latent_tokens} latent tokens "
                             "from a resampler trained with its decoder: reuse its reverse transformer only together "
                             "with that decoder (--decoder-from a checkpoint with the same resampler)")
    if encoder_of:
        config = dataclasses.replace(config, **next(iter(encoder_of.values())))
    return config, reused


class Trainer:
    def __init__(self, texts: list[str], out: str | Path, model_config: ModelConfig, train_config: TrainConfig,
                 *, conditions: list[str] | None = None, resume: bool = False, progress: bool = True, log=print,
                 encoding_cache: str | Path | None = None):
        self.out = Path(out)
        self.encoding_cache = Path(encoding_cache) if encoding_cache else None  # shared across runs; None: training/
        self.state_dir = self.out / "training"
        self.cfg = train_config
        self.progress = progress
        self.log = log
        self.device = training_device(train_config.device)
        check_conditions(model_config, texts, conditions)
        train_idx, val_idx = holdout_indices(len(texts), train_config.holdout_fraction, seed=train_config.seed,
                                             groups=_holdout_groups(model_config, train_config, conditions))
        self.train_texts, self.val_texts = [texts[i] for i in train_idx], [texts[i] for i in val_idx]
        if len(self.train_texts) < 2:  # one latent has no spread: its std, the scale of every sample, is undefined
            raise ValueError(f"training needs at least 3 texts (2 to train on, 1 held out), got {len(texts)}: give "
                             "more lines (a useful model wants thousands)")
        fingerprint = _fingerprint(texts, model_config.encoder, conditions)
        self.generator = torch.Generator().manual_seed(train_config.seed)
        self.saved_rng: dict[str, torch.Tensor] = {}  # generator states of a resumed run (ldlm.training.train.Trainer.save)
        self.ema: ReverseTransformer | None = None  # EMA weights of the reverse transformer, when enabled

        if resume:
            self.components, self.state = self._load_state(fingerprint)
            held_by = self.state["train_config"].get("holdout_by", "line")
            if held_by != train_config.holdout_by:
                raise ValueError(f"{self.out} held out by {held_by}: resume with --holdout-by {held_by}")
        else:
            if (self.out / "config.json").exists():
                raise FileExistsError(f"{self.out} already holds a checkpoint: pass --resume, or a new --out")
            model_config, reused = load_reused_parts(model_config, train_config)
            fingerprint = _fingerprint(texts, model_config.encoder, conditions)
            self.components = build_components(model_config, self.train_texts, seed=train_config.seed, log=log,
                                               reused=reused)
            self.state = {"fingerprint": fingerprint, "stage": STAGES[0], "steps": {s: 0 for s in STAGES},
                          "elapsed": {s: 0.0 for s in STAGES}, "train_config": dataclasses.asdict(train_config),
                          "reused": {stage: str(Path(p)) for stage, p in (("decoder", train_config.decoder_from),
                                                                          ("diffusion", train_config.reverse_from)) if p}}
        c = self.components
        self.config = c.config
        self.encodings = EncodedCorpus(c.encoder, self.train_texts, self.val_texts, state_dir=self.state_dir,
                                       cache_dir=self.encoding_cache, progress=progress, log=log)
        self.state_dir.mkdir(parents=True, exist_ok=True)  # the log and resume state; encodings may live elsewhere
        for module in (c.encoder, c.decoder, c.reverse, self.ema):  # the latents and their statistics stay on the CPU
            if module is not None:
                module.to(self.device)
        if self.config.latent_tokens > 1:
            if train_config.decoder_noise > 0:
                raise ValueError("decoder_noise needs latent_tokens = 1 (its scale is the latent std, which the "
                                 "resampler changes while it trains): drop --decoder-noise or --latent-tokens")
            self.train_states, self.val_states = self.encodings.token_states()
            self.train_latents, self.val_latents = self._resampled()
        else:
            self.train_latents, self.val_latents = self.encodings.latents()
        if not resume and train_config.reverse_from is None:
            self._set_latent_stats()
        self.schedule = NoiseSchedule.from_config(self.config).to(self.device)
        self.conditions = None  # what each example is generated from (a conditional model)
        if conditions is not None:
            train_c, val_c = [conditions[i] for i in train_idx], [conditions[i] for i in val_idx]
            self.conditions = TrainingConditions(self.config, {"train": train_c, "val": val_c},
                                                 self.encodings.source_states)
        self.train_ids = self._token_ids(self.train_texts)
        self.val_ids = self._token_ids(self.val_texts)

    # --- setup -----------------------------------------------------------------------------------
    def _load_state(self, fingerprint: str):
        state_file = self.state_dir / "state.json"
        if not state_file.is_file():
            raise FileNotFoundError(f"nothing to resume: {state_file} is missing; start without --resume")
        state = json.loads(state_file.read_text())
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{self.out} was trained on other data or another encoder: resume with the same --data")
        self.saved_rng = load_file(str(self.state_dir / "rng.safetensors"))
        self.generator.set_state(self.saved_rng["generator"])
        components = load_checkpoint(self.out)
        raw = self.state_dir / "reverse_raw.safetensors"
        if raw.is_file():  # the checkpoint serves EMA weights; training continues from the raw ones
            self.ema = copy.deepcopy(components.reverse)
            load_model(components.reverse, str(raw))
        return components, state

    def _resample(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Token states [(L_i, D)] -> latent tokens (N, K, D) on the training device, through the resampler (with
        grad when training)."""
        hidden, mask = pad_states(states)
        return self.components.encoder.resampler(hidden.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def _resampled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (N, K, D) of the train and validation texts through the resampler as it is now."""
        def run(states: list[torch.Tensor]) -> torch.Tensor:
            order = sorted(range(len(states)), key=lambda i: len(states[i]))  # batches of similar length
            out = torch.empty(len(states), *self.config.latent_shape)
            for start in range(0, len(order), 256):
                idx = order[start : start + 256]
                out[idx] = self._resample([states[i] for i in idx]).cpu()
            return out

        return run(self.train_states), run(self.val_states)

    def _set_latent_stats(self) -> None:
        """Normalization statistics, per latent element, from the training split."""
        self.components.latent_mean = self.train_latents.mean(dim=0)
        self.components.latent_std = self.train_latents.std(dim=0).clamp(min=1e-6)

    def _decoder_latents(self, split: str, idx: list[int]) -> torch.Tensor:
        """Stage 1's input latents for these items, on the training device: the cached pooled latents, or (K > 1)
        the resampler's output on their token states, with grad so the resampler trains with the decoder."""
        if self.config.latent_tokens > 1:
            return self._resample([(self.train_states if split == "train" else self.val_states)[i] for i in idx])
        return (self.train_latents if split == "train" else self.val_latents)[idx].to(self.device)

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return self.components.decoder.tokenizer(texts)["input_ids"] if texts else []

    # --- batches and losses ----------------------------------------------------------------------
    def _decoder_loss(self, latents: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
        ids, mask = self.components.decoder.pad(rows)
        with autocast(self.device, self.cfg.precision):
            return self.components.decoder.loss(latents, ids.to(self.device), mask.to(self.device))

    def _diffusion_loss(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, model=None,
                        generator: torch.Generator | None = None, rows: tuple[str, torch.Tensor] | None = None,
                        dropout: float = 0.0) -> torch.Tensor:
        """MSE of the x0 prediction; z0 (B, *latent_shape) on the training device, t (B,) and noise drawn on the CPU.
        A conditional model reads the condition of `rows` (split, example ids), each row replaced by the null
        condition with probability `dropout`."""
        model = model or self.components.reverse
        generator = generator or self.generator
        t, noise = t.to(self.device), noise.to(self.device)
        x_t = add_noise(self.schedule, z0, t, noise)
        x0_prev, condition = None, None
        with autocast(self.device, self.cfg.precision):
            if self.conditions is not None:
                condition = self.conditions.batch(model, *rows, self.device)
                if dropout > 0:
                    dropped = torch.rand(z0.shape[0], generator=generator) < dropout  # (B,)
                    condition = model.drop(condition, dropped.to(self.device))
            if self.config.self_condition:  # half the batch sees its own (detached) first estimate, half sees zeros
                with torch.no_grad():
                    estimate = model(x_t, t.float(), None, condition)
                keep = torch.rand(z0.shape[0], generator=generator) < 0.5  # (B,)
                keep = keep.view(-1, *(1,) * (z0.dim() - 1)).to(self.device)  # (B, 1) or (B, 1, 1) with K tokens
                x0_prev = torch.where(keep, estimate, torch.zeros_like(estimate))
            return F.mse_loss(model(x_t, t.float(), x0_prev, condition).float(), z0)

    def _normalized(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.components.latent_mean) / self.components.latent_std

    @torch.no_grad()
    def _validate(self, stage: str) -> float | None:
        if not self.val_texts:
            return None
        module = self.components.decoder if stage == "decoder" else self.components.reverse
        module.eval()
        losses = []
        fixed = torch.Generator().manual_seed(1234)  # the same t and noise at every evaluation
        for start in range(0, len(self.val_texts), 256):
            latents = self.val_latents[start : start + 256]
            if stage == "decoder":
                latents = self._decoder_latents("val", list(range(start, start + len(latents))))
                losses.append(self._decoder_loss(latents, self.val_ids[start : start + 256]).item() * len(latents))
            else:
                z0 = self._normalized(latents).to(self.device)
                t = torch.randint(0, self.schedule.num_timesteps, (len(z0),), generator=fixed)
                noise = torch.randn(z0.shape, generator=fixed)
                rows = ("val", torch.arange(start, start + len(latents)))
                losses.append(self._diffusion_loss(z0, t, noise, self.ema, fixed, rows).item() * len(latents))
        module.train()
        return sum(losses) / len(self.val_texts)

    # --- the loop --------------------------------------------------------------------------------
    def _stage_limits(self, stage: str) -> tuple[int | None, float | None]:
        steps = self.cfg.decoder_steps if stage == "decoder" else self.cfg.diffusion_steps
        if self.cfg.time_budget is None:
            return steps, None
        if stage == "decoder":
            return steps, self.cfg.time_budget * self.cfg.decoder_share
        return steps, self.cfg.time_budget - self.state["elapsed"]["decoder"]

    def _optimizer(self, stage: str):
        """The stage's optimizer (restored on resume) and its learning-rate factor, a function of
        (step, fraction of the stage's step or time budget used)."""
        if stage == "decoder":
            params = [p for p in self._stage1_parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=self.cfg.decoder_lr, weight_decay=0.01)

            def lr_factor(step: int, done: float) -> float:
                return warmup_cosine(step, done, self.cfg.warmup_steps)
        else:
            optimizer = torch.optim.Adam(self.components.reverse.parameters(), lr=self.cfg.diffusion_lr)

            def lr_factor(step: int, done: float) -> float:  # constant, as the design says
                return 1.0
        path = self.state_dir / f"{stage}_optimizer.safetensors"
        if path.is_file() and self.state["steps"][stage] > 0:
            load_optimizer(optimizer, path)
        return optimizer, lr_factor

    def _stage1_parameters(self) -> list[torch.nn.Parameter]:
        """The decoder's parameters, and the resampler's when there is one (trained together)."""
        resampler = self.components.encoder.resampler
        return [*self.components.decoder.parameters(), *(resampler.parameters() if resampler is not None else [])]

    @property
    def diffusion_batch_size(self) -> int:
        """Texts per stage-2 step: the configured size, or LATENTS_PER_DIFFUSION_STEP latent vectors."""
        return self.cfg.diffusion_batch_size or max(1, LATENTS_PER_DIFFUSION_STEP // self.config.latent_tokens)

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.ema is not None:  # serve the EMA weights; keep the raw ones for --resume
            save_checkpoint(dataclasses.replace(self.components, reverse=self.ema), self.out)
            save_model(self.components.reverse, str(self.state_dir / "reverse_raw.safetensors"))
        else:
            save_checkpoint(self.components, self.out)
        for stage, optimizer in getattr(self, "_optimizers", {}).items():
            save_optimizer(optimizer, self.state_dir / f"{stage}_optimizer.safetensors")
        save_file({"generator": self.generator.get_state(), **self._dropout_rng_states()},
                  str(self.state_dir / "rng.safetensors"))
        (self.state_dir / "state.json").write_text(json.dumps(self.state, indent=2))

    def _write_log(self, record: dict) -> None:
        with (self.state_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _budget_left(self, stage: str) -> bool:
        if stage in self.state.get("reused", {}):
            return False
        max_steps, max_seconds = self._stage_limits(stage)
        return ((max_steps is None or self.state["steps"][stage] < max_steps)
                and (max_seconds is None or self.state["elapsed"][stage] < max_seconds))

    # --- randomness beyond self.generator: dropout draws from torch's global generators ----------------
    def _dropout_rng_states(self) -> dict[str, torch.Tensor]:
        """The global generators' states (CPU, and the training GPU's), saved so --resume continues them."""
        states = {"dropout_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["dropout_cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def _seed_dropout(self) -> None:
        """The global generators as a resumed run left them, else seeded from the config's seed: a run is
        reproducible whatever the process did before (torch seeds its global generator at random)."""
        seed = self.cfg.seed + 3  # seed .. seed + 2 initialize the decoder, reverse transformer and resampler
        if "dropout_cpu" in self.saved_rng:
            torch.set_rng_state(self.saved_rng["dropout_cpu"])
        else:
            torch.random.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            if "dropout_cuda" in self.saved_rng:
                torch.cuda.set_rng_state(self.saved_rng["dropout_cuda"], self.device)
            else:
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)

    def run(self) -> dict:
        """Run each stage that has budget left. The stages are independent given the frozen encoder, so a
        resumed run with larger limits continues whichever stage they extend. The global generators are forked:
        training leaves the caller's random state as it was."""
        gpus = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=gpus):
            self._seed_dropout()
            return self._run_stages()

    def _run_stages(self) -> dict:
        self._optimizers = {}
        summary = {}
        if (self.config.latent_tokens > 1 and self.state["steps"]["diffusion"] > 0
                and self._budget_left("decoder")):
            raise ValueError("with latent_tokens > 1 the decoder stage trains the resampler, which would change the "
                             "latents the reverse transformer has learned: once stage 2 has begun, extend only "
                             "the diffusion stage (keep --decoder-steps and the decoder's share of the budget)")
        for stage in STAGES:
            if self._budget_left(stage):
                if stage == "diffusion" and self.state["steps"]["diffusion"] == 0:  # a fresh stage 2
                    if self.config.latent_tokens > 1:  # the resampler trained in stage 1: latents changed
                        self.train_latents, self.val_latents = self._resampled()
                    self._set_latent_stats()
                self.state["stage"] = stage
                summary[stage] = self._run_stage(stage)
            elif stage in self.state.get("reused", {}):
                summary[stage] = {"reused_from": self.state["reused"][stage]}
            else:
                summary[stage] = {"steps": self.state["steps"][stage], "seconds": self.state["elapsed"][stage]}
        self.state["stage"] = "done"
        self.save()
        return summary

    def _run_stage(self, stage: str) -> dict:
        c = self.components
        module = c.decoder if stage == "decoder" else c.reverse
        module.train()
        optimizer, lr_factor = self._optimizer(stage)
        self._optimizers[stage] = optimizer
        if stage == "diffusion" and self.cfg.ema_decay and self.ema is None:
            self.ema = copy.deepcopy(module).eval().requires_grad_(False)
        # from the config: a restored optimizer's groups hold the last scheduled rate, not the base one
        base_lr = self.cfg.decoder_lr if stage == "decoder" else self.cfg.diffusion_lr
        batch_size = self.cfg.decoder_batch_size if stage == "decoder" else self.diffusion_batch_size
        max_steps, max_seconds = self._stage_limits(stage)
        n_train = len(self.train_texts)
        z_train = self._normalized(self.train_latents).to(self.device) if stage == "diffusion" else None

        step, elapsed = self.state["steps"][stage], self.state["elapsed"][stage]
        bar = tqdm(total=max_steps, initial=step, desc=stage, disable=not self.progress, dynamic_ncols=True)
        last_save, val_loss, loss_ema, step_time = time.perf_counter(), None, None, None
        window = (time.perf_counter(), step)
        while self._budget_left(stage):
            t0 = time.perf_counter()
            idx = torch.randint(0, n_train, (batch_size,), generator=self.generator)
            if stage == "decoder":
                latents = self._decoder_latents("train", idx.tolist())
                if self.cfg.decoder_noise > 0:  # imperfect sampled latents should still decode (issue 4 lever)
                    noise = torch.randn(latents.shape, generator=self.generator)
                    latents = latents + (self.cfg.decoder_noise * c.latent_std * noise).to(self.device)
                loss = self._decoder_loss(latents, [self.train_ids[i] for i in idx.tolist()])
            else:
                t = torch.randint(0, self.schedule.num_timesteps, (batch_size,), generator=self.generator)
                noise = torch.randn(batch_size, *c.config.latent_shape, generator=self.generator)
                loss = self._diffusion_loss(z_train[idx.to(self.device)], t, noise, rows=("train", idx),
                                            dropout=self.cfg.condition_dropout)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{stage} loss became {loss.item()} at step {step}: lower the learning rate")
            done = max(step / max_steps if max_steps else 0.0, elapsed / max_seconds if max_seconds else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = base_lr * lr_factor(step, done)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self._stage1_parameters() if stage == "decoder" else module.parameters(), 1.0)
            optimizer.step()
            if stage == "diffusion" and self.ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(list(self.ema.parameters()), list(module.parameters()), 1 - self.cfg.ema_decay)
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            step_time = dt if step_time is None else 0.95 * step_time + 0.05 * dt
            loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
            self.state["steps"][stage], self.state["elapsed"][stage] = step, elapsed

            if step % self.cfg.eval_every == 0:
                val_loss = self._validate(stage)
                rate = batch_size * (step - window[1]) / (time.perf_counter() - window[0])
                window = (time.perf_counter(), step)
                self._write_log({"stage": stage, "step": step, "loss": loss_ema, "val_loss": val_loss,
                                 "examples_per_s": rate, "elapsed_s": elapsed})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.4f}", val=f"{val_loss:.4f}" if val_loss is not None else "-",
                            ex_s=f"{batch_size / step_time:.0f}",
                            left=_time_left(step, elapsed, step_time, max_steps, max_seconds))
            if time.perf_counter() - last_save > self.cfg.save_every:
                self.save()
                last_save = time.perf_counter()
        bar.close()
        module.eval()
        val_loss = self._validate(stage)
        self._write_log({"stage": stage, "step": step, "loss": loss_ema, "val_loss": val_loss, "elapsed_s": elapsed,
                         "final": True})
        self.save()
        self.log(f"{stage}: {step} steps in {elapsed:.0f}s, train loss {loss_ema if loss_ema is not None else float('nan'):.4f}, "
                 f"held-out loss {val_loss if val_loss is not None else float('nan'):.4f}")
        return {"steps": step, "seconds": elapsed, "train_loss": loss_ema, "val_loss": val_loss}


def check_conditions(config: ModelConfig, texts: list[str], conditions: list[str] | None) -> None:
    """A conditional model trains on one condition per text (a source text or a label name); an unconditional
    one on none."""
    if config.condition is None:
        if conditions is not None:
            raise ValueError("conditions were given for an unconditional model: set condition='text' or 'label' "
                             "(ldlm train --source-field / --label-field)")
        return
    if conditions is None or len(conditions) != len(texts):
        raise ValueError(f"a {config.condition}-conditioned model trains on one condition per text: got "
                         f"{'none' if conditions is None else len(conditions)} for {len(texts)} texts")
    for i, condition in enumerate(conditions):
        if not isinstance(condition, str) or not condition.strip():
            raise ValueError(f"the condition of text {i} is {condition!r}: give each a non-empty "
                             f"{'source text' if config.condition == 'text' else 'label'}")


def train(texts: list[str], out: str | Path, model_config: ModelConfig, train_config: TrainConfig | None = None,
          *, conditions: list[str] | None = None, resume: bool = False, progress: bool = True, log=print,
          encoding_cache: str | Path | None = None) -> dict:
    """Train both stages; returns a summary per stage. `out` becomes a checkpoint directory. A conditional
    model (model_config.condition) takes `conditions`, one source text or label per text; a label model
    without a label set gets the data's distinct labels, sorted. `encoding_cache`: a folder where encoded
    corpora are kept by what decides them, so that other runs on the same texts reuse them."""
    if model_config.condition == "label" and model_config.labels is None and conditions is not None:
        model_config = dataclasses.replace(model_config, labels=sorted(set(conditions)))
    out = Path(out)
    check_training_out(out)
    with training_lock(out):
        trainer = Trainer(texts, out, model_config, train_config or TrainConfig(), conditions=conditions,
                          resume=resume, progress=progress, log=log, encoding_cache=encoding_cache)
        return trainer.run()
