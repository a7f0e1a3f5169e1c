"""What each kernel computes, in torch's own ops: the path taken where a kernel does not run, and what the
kernels' tests compare with; `residual_norm` picks the fused kernel or torch's two ops.

The kernels themselves, one module each: Triton's fused per-step update (`fused_update`), a residual add with the
layer norm after it (`add_layer_norm`), a linear layer with its layer norm, bias, GELU and residual
(`fused_linear`), the beam decode's one-query attention read through a table of source rows (`beam_attention`) and
its selection from the last hidden state (`beam_head`: LM head, log-softmax, n-gram ban, top-2K); `aot` compiles
them ahead of time for a GPU architecture. C, for the CPU: the beam search's per-token bookkeeping and the KV
cache's row gather (`beam_update.c`, built and loaded by `native`).

`ldlm.kernels` has no `__init__.py` on purpose: the folder `kernels/` sits at the repository's root, and a
regular package there would shadow Hugging Face's `kernels` distribution (which transformers imports) for any
Python started from the root. As a namespace portion it never does: a regular package anywhere on `sys.path`
wins over it."""

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


def ban_tokens(log_probs, banned):
    """log_probs (R, V) with each row's banned tokens (R, W) ids, -1 for none, set to -inf."""
    if banned.shape[1] == 0:
        return log_probs
    V = log_probs.shape[1]
    mask = torch.zeros(log_probs.shape[0], V + 1, dtype=torch.bool, device=log_probs.device)  # column V: "none"
    mask.scatter_(1, torch.where(banned >= 0, banned, V), True)
    return log_probs.masked_fill(mask[:, :V], float("-inf"))


def beam_head_reference(h, norm, head, running_scores, banned, *, candidates):
    """ldlm.kernels.beam_head.beam_head_topk's function in torch, the (B * K, V) logits written out: each item's
    `candidates` best (score, beam * V + token) of log_softmax(head(norm(h))) with bans, plus the beam's score."""
    B, K = running_scores.shape
    log_probs = ban_tokens(torch.nn.functional.log_softmax(head(norm(h)).float(), dim=-1), banned)
    V = log_probs.shape[1]
    return (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V).topk(candidates, dim=1)
