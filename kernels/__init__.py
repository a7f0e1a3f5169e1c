"""Kernels for the engine's hot loops. Triton: the fused per-step update (`fused_update`), a residual add with
the layer norm after it (`add_layer_norm`), a linear layer with its layer norm, bias, GELU and residual
(`fused_linear`) and the beam decode's one-query attention read through a table of
source rows (`beam_attention`); `aot` compiles them ahead of time for a GPU architecture. C, for the CPU: the
beam search's per-token bookkeeping and the KV cache's row gather (`beam_update.c`, built and loaded by
`native`)."""

from __future__ import annotations

import torch


def add_then_norm(h, y, norm):
    """torch's residual add and the layer norm after it, as two kernels: (h + y, norm(h + y))."""
    h = h + y
    return h, norm(h)


def residual_norm(fused: bool):
    """The function (h, y, norm) -> (h + y, norm(h + y)) a block's tail calls: the one Triton kernel
    (ldlm.kernels.add_layer_norm, which updates h in place) when fused, torch's add and norm otherwise.
    Importing this module imports no Triton; the fused kernel needs it (on CPU, TRITON_INTERPRET=1)."""
    if not fused:
        return add_then_norm
    from .add_layer_norm import add_layer_norm

    return add_layer_norm


def modules_linear(x, linear, *, norm=None, gelu=False, residual=None):
    """ldlm.kernels.fused_linear's function as torch's modules, a kernel each: act(norm(x) @ W^T + b) + residual."""
    y = linear(norm(x) if norm is not None else x)
    y = torch.nn.functional.gelu(y, approximate="tanh" if gelu == "tanh" else "none") if gelu else y
    return y + residual if residual is not None else y
