"""Classifier-free guidance (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"), and the conditions it reads.

A conditional reverse transformer is trained with its condition replaced by a learned null condition for a
share of the rows (condition dropout), so it predicts both x0 | condition and x0 unconditionally. Sampling
combines the two predictions with a weight w >= 0:

    x0 = x0_null + w * (x0_cond - x0_null)

w = 0 is unconditional, w = 1 the plain conditional model, w > 1 pushes further towards the condition. The
two rows of each item run as one batched forward pass; w = 0 and w = 1 need only one of them.
"""

from __future__ import annotations

import math

import torch

from ldlm.inputs import check_texts
from ldlm.model.encoder import pad_states
from ldlm.model.reverse import Condition, ReverseTransformer

MAX_GUIDANCE = 100.0  # w scales the conditional-minus-null difference: past this, half precision overflows
# (and text degrades long before: useful weights are 1 to about 5)


def check_guidance(guidance, name: str = "guidance") -> None:
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not (
            isinstance(guidance, int) or math.isfinite(guidance)) or not 0 <= guidance <= MAX_GUIDANCE:
        raise ValueError(f"{name} must be a number from 0 to {MAX_GUIDANCE:g} (0 unconditional, 1 conditional, "
                         f"above 1 guided; 1 to 5 is useful), got {guidance!r}")


def check_labels(labels, known: list[str]) -> list[int]:
    """Label names -> their ids in the model's label set; an unknown one names the item and the choices."""
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        raise TypeError("pass labels as a list of names, e.g. [\"positive\"]")
    index = {name: i for i, name in enumerate(known)}
    for i, label in enumerate(labels):
        if label not in index:
            raise ValueError(f"label {i} is {label!r}, not one of this model's labels {known}")
    return [index[label] for label in labels]


def check_condition(config, n: int, sources: list[str] | None, labels: list[str] | None) -> None:
    """What a call generates from, checked against the model (a ModelConfig) before any work: the right kind,
    one per item, each valid (non-empty sources, known labels)."""
    if sources is None and labels is None:
        return
    kind = config.condition
    if kind is None:
        raise ValueError("this checkpoint is unconditional: it generates from no source or label; use generate(n), "
                         "or train a conditional model (ldlm train --source-field / --label-field)")
    if sources is not None and labels is not None:
        raise ValueError("pass sources or labels, not both")
    if kind == "text" and sources is None:
        raise ValueError("this model is conditioned on a source text: pass sources=[...], not labels")
    if kind == "label" and labels is None:
        raise ValueError(f"this model is conditioned on a label: pass labels=[...] from {config.labels}")
    if sources is not None:
        check_texts(sources)
    else:
        check_labels(labels, config.labels)
    given = sources if sources is not None else labels
    if len(given) != n:
        raise ValueError(f"{len(given)} {'sources' if sources is not None else 'labels'} for {n} items: give one each")


def encode_condition(model: ReverseTransformer, encoder, *, sources: list[str] | None = None,
                     labels: list[str] | None = None, device: torch.device) -> Condition:
    """The Condition of a batch (checked by check_condition): source texts through the frozen encoder's token
    states (over-long ones truncated with a warning naming the item), or label names through the label
    embedding."""
    if labels is not None:
        ids = torch.tensor(check_labels(labels, model.config.labels), dtype=torch.long, device=device)
        return model.embed_condition(ids)
    states, mask = pad_states(encoder.token_states(sources))  # (B, L, D) on the CPU, (B, L)
    return model.embed_condition(states.to(device), mask.to(device))


def projected(model, condition: Condition) -> Condition:
    """`condition` as a cross-attention model's blocks read it, each block's keys and values projected once
    (project_condition: ReverseTransformer's, the compiled module's, the ONNX export's condition_kv graph), so
    that a sampling run does not project it again at every step; a joint-attention model's as it is."""
    if model.config.condition_attention != "cross":
        return condition
    return model.project_condition(condition)


def guided_denoiser(model, condition: Condition | None, guidance: float):
    """A denoiser (x_t, t) -> x0_hat for the samplers (ldlm.sampling.samplers), reading `condition` (one row per row of
    x_t; None: the null condition) with guidance weight w. A self-conditioned model gets each guided estimate
    back as the next step's x0_prev (one fresh state per sampling run). `model`: a ReverseTransformer, or
    any (x_t, t[, x0_prev]) denoiser of an unconditional model (the ONNX graph). The rows' condition (and for
    w > 1 the null condition beside it) is batched and projected once per run, not at every step."""
    check_guidance(guidance)
    previous = None
    read = None  # what each forward reads: the condition's rows, then (w > 1) as many null rows
    if condition is not None and guidance != 0:
        read = projected(model, condition)
        if guidance != 1:  # the null rows projected apart: one token each, not the sources' padded length
            read = Condition.cat([read, projected(model, model.null(condition.tokens.shape[0]))])

    def forward(x_t: torch.Tensor, t: torch.Tensor, prev: torch.Tensor | None, cond: Condition | None):
        args = (x_t, t, prev) if model.config.self_condition else (x_t, t)
        return model(*args) if cond is None else model(*args, condition=cond)

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal previous
        if read is None:
            x0 = forward(x_t, t, previous, None)
        elif guidance == 1:
            x0 = forward(x_t, t, previous, read)
        else:  # conditional and null rows in one forward: (2B, ...)
            B = x_t.shape[0]
            prev = None if previous is None else torch.cat([previous, previous])
            x0_cond, x0_null = forward(torch.cat([x_t, x_t]), torch.cat([t, t]), prev, read).split(B)
            x0 = x0_null + guidance * (x0_cond - x0_null)
        previous = x0
        return x0

    return denoise
