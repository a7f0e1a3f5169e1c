"""The reverse transformer rearranged for a sampler's fixed steps: the same function, fewer kernels and FLOPs.

Rewrites of ldlm.model.reverse.ReverseTransformer, exact but for float rounding, for the engine's sampling loop:

- Time as a per-step input bias. The input projection is linear, so W [x ; emb(t_s)] + b = W_x x + (W_t emb(t_s)
  + b). A sampler visits a fixed list of timesteps, so the second term (with the position embeddings, for K
  latent tokens) is computed once per step into a table, and a step gathers its row: no time embedding, no
  concatenation, and the projection reads D inputs instead of D + E.
- One latent token: attention over a single key returns the value, so the value and output projections compose
  into one linear map, W_o (W_v y + b_v) + b_o = (W_o W_v) y + (W_o b_v + b_o), folded once, in float64.
- Optionally (fused_norms, the engine's choice), each residual add and the layer norm that follows it as one
  Triton kernel (ldlm.kernels.add_layer_norm).
- Or (fused_blocks) every matmul of a block as one Triton kernel with its neighbours (ldlm.kernels.fused_linear):
  the layer norm before it, the bias, GELU and residual add after it. A one-token block is then three launches
  (LN1 -> folded value/output -> + residual, LN2 -> up -> GELU, down -> + residual), the final norm and
  projection one more. With fp8_weights the blocks' matrices are read as float8 e4m3 codes with a scale per
  output channel (ldlm.kernels.fused_linear.Fp8Linear): half of bf16's bytes; the input and output projections
  keep the model's dtype, as the int8 export keeps them fp32. Not exact: the codes round each weight to 3
  mantissa bits (bench/quality/fp8_weights.py says what that costs in latents and text).
- A condition read by cross-attention (config.condition_attention "cross") does not change over a sampling
  run, so its keys and values are projected once per run (condition_states) instead of at every step.

Everything else (layer norms, MLPs, output) is the original modules, shared, not copied. On the `base` preset
the engine's sampling step goes from 44 kernels to 31 and its matmul FLOPs down by a tenth
(bench/gpu/step_kernels.py); tests/test_folded_reverse.py checks it against the model step by step, and
tests/test_fused_sampler.py over whole sampling loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldlm.kernels.reference import residual_norm
from ldlm.model.reverse import Condition, ReverseTransformer, timestep_embedding


@dataclass
class ConditionStates:
    """A condition as the folded blocks' cross-attentions read it: per block its keys and values."""

    keys_values: list[tuple[torch.Tensor, torch.Tensor]]  # per block: k, v, each (B, H, L, C/H)
    mask: torch.Tensor  # (B, L) bool, True for a real condition token


class FoldedReverse(nn.Module):
    """x0_hat = model(x_t, timesteps[step]) for a step index held on the device (a sampler's step counter)."""

    @torch.no_grad()
    def __init__(self, model: ReverseTransformer, timesteps: torch.Tensor, *, fused_norms: bool = False,
                 fused_blocks: bool = False, fp8_weights: bool = False):
        """model: a ReverseTransformer in eval mode (any dtype, any device); timesteps: (S,) the continuous t of
        each sampler step, in order; fused_norms: each residual add and the layer norm after it as one Triton
        kernel (ldlm.kernels.add_layer_norm); fused_blocks: each matmul with its layer norm, bias, GELU and
        residual as one (ldlm.kernels.fused_linear; the norms are then inside it, fused_norms unused);
        fp8_weights: with fused_blocks, the blocks' weights as float8 e4m3 with per-channel scales (on CUDA,
        compute capability 8.9 or later). Triton kernels run on CPU through TRITON_INTERPRET=1."""
        super().__init__()
        cfg = model.config
        self.fused_norms, self.fused_blocks = fused_norms, fused_blocks
        if fp8_weights and not fused_blocks:
            raise ValueError("fp8_weights needs fused_blocks=True: the float8 weights are read by "
                             "ldlm.kernels.fused_linear")
        device = model.in_proj.weight.device
        if fp8_weights and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ValueError(f"fp8_weights needs a GPU of compute capability 8.9 or later (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(device)} is "
                             f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}: leave it off")
        if fused_blocks:  # the kernel, imported only when used (it imports Triton)
            from ldlm.kernels.fused_linear import Fp8Linear, fused_linear

            self.linear = fused_linear  # (x, linear, *, norm, gelu, residual) -> act(norm(x) W^T + b) + residual
            self._weights = Fp8Linear if fp8_weights else (lambda linear: linear)  # a block matrix as launched
        self.add_norm = residual_norm(fused_norms)  # (h, y, norm) -> (h + y, norm(h + y))
        self.config, self.blocks, self.ln_f, self.out_proj = cfg, model.blocks, model.ln_f, model.out_proj
        if cfg.condition is not None and cfg.condition_attention != "cross":
            raise ValueError(f"the folded reverse transformer reads conditions by cross-attention; this model's "
                             f"condition_attention is {cfg.condition_attention!r} (run it on the reference backend)")
        self.conditional = cfg.condition is not None
        self.null = model.null if self.conditional else None  # (batch) -> the null Condition
        weight, bias = model.in_proj.weight, model.in_proj.bias  # (d, n_in + E), (d,)
        dtype = weight.dtype
        n_in = cfg.latent_dim * (2 if cfg.self_condition else 1)  # x_t, and x0_prev when self-conditioned
        self.register_buffer("in_weight", weight[:, :n_in].contiguous(), persistent=False)  # (d, n_in)
        emb = timestep_embedding(timesteps.to(device, torch.float32), cfg.time_embed_dim)  # (S, E)
        step_bias = emb.double() @ weight[:, n_in:].double().T + bias.double()  # (S, d)
        if cfg.latent_tokens > 1:
            step_bias = step_bias[:, None, :] + model.pos_emb.double()  # (S, K, d)
        self.register_buffer("step_bias", step_bias.to(dtype), persistent=False)
        self.value_out = nn.ModuleList()  # per block, with one latent token: W_o W_v and W_o b_v + b_o
        if cfg.latent_tokens == 1:
            C = cfg.d_model
            for block in model.blocks:
                qkv, proj = block.attn.qkv, block.attn.proj
                w_v, b_v = qkv.weight[2 * C :].double(), qkv.bias[2 * C :].double()  # (C, C), (C,)
                folded = nn.Linear(C, C, device=device, dtype=dtype).requires_grad_(False)
                folded.weight.copy_(proj.weight.double() @ w_v)
                folded.bias.copy_(proj.weight.double() @ b_v + proj.bias.double())
                self.value_out.append(folded)
        # per block: its attention (over one token, its value projected: the folded matrix) and the norm after it
        self.attentions = tuple(self.value_out) if cfg.latent_tokens == 1 else tuple(b.attn for b in model.blocks)
        self.following_norms = (*(block.ln_1 for block in model.blocks[1:]), model.ln_f)
        if fused_blocks:  # per block, the matrices its fused launches read (float8 copies, or the modules)
            self.block_linears = nn.ModuleList(nn.ModuleDict({
                name: self._weights(linear) for name, linear in self._block_matrices(i, block).items()})
                for i, block in enumerate(model.blocks))

    def _block_matrices(self, i: int, block: nn.Module) -> dict[str, nn.Module]:
        """Block i's linear layers as _fused_blocks launches them, by role."""
        attention = ({"value_out": self.value_out[i]} if self.config.latent_tokens == 1
                     else {"qkv": block.attn.qkv, "proj": block.attn.proj})
        cross = {"cross_q": block.cross.q, "cross_proj": block.cross.proj} if self.conditional else {}
        return {**attention, **cross, "up": block.mlp[0], "down": block.mlp[2]}  # mlp: Linear, GELU, Linear, Dropout

    @torch.no_grad()
    def condition_states(self, condition: Condition) -> ConditionStates:
        """Each block's cross-attention keys and values of `condition` (tokens (B, L, d_model)): the same
        projections the model makes at every step, made once."""
        tokens = condition.tokens.to(self.in_weight.dtype)
        return ConditionStates([block.cross.keys_values(tokens) for block in self.blocks], condition.mask)

    def forward(self, x_t: torch.Tensor, step: torch.Tensor, x0_prev: torch.Tensor | None = None,
                condition: ConditionStates | None = None) -> torch.Tensor:
        """x_t: (B, D), or (B, K, D) with K latent tokens; step: (1,) int64 index into the timesteps (on the
        device); x0_prev: the previous estimate, x_t's shape (self-conditioned models only); condition: a
        conditional model's condition_states, one row per row of x_t (None: the null condition). Returns x_t's
        shape."""
        one_token = self.config.latent_tokens == 1
        if one_token and x_t.dim() == 3:  # (B, 1, D): run as (B, D)
            prev = None if x0_prev is None else x0_prev[:, 0]
            return self.forward(x_t[:, 0], step, prev, condition)[:, None]
        if self.conditional and condition is None:
            condition = self.condition_states(self.null(x_t.shape[0]))
        elif condition is not None and not self.conditional:
            raise ValueError("this reverse transformer is unconditional: it takes no condition")
        if self.config.self_condition:
            x_t = torch.cat([x_t, torch.zeros_like(x_t) if x0_prev is None else x0_prev], dim=-1)  # (B, [K,] 2D)
        if one_token:
            bias = self.step_bias.index_select(0, step).view(-1)  # (d,)
            h = F.linear(x_t, self.in_weight, bias)  # (B, d): one matmul with its bias
        else:
            h = F.linear(x_t, self.in_weight) + self.step_bias.index_select(0, step)  # (B, K, d)
        if self.fused_blocks:
            return self._fused_blocks(h, condition)
        x = self.blocks[0].ln_1(h)  # h: the residual stream; x: its normalized value, each block's input
        for i, (block, attention, next_norm) in enumerate(zip(self.blocks, self.attentions, self.following_norms)):
            if condition is None:
                h, x = self.add_norm(h, attention(x), block.ln_2)
            else:  # self-attention, then cross-attention to the condition, as ldlm.model.reverse.Block
                h, x = self.add_norm(h, attention(x), block.ln_cross)
                h, x = self.add_norm(h, block.cross.attend(x, *condition.keys_values[i], condition.mask), block.ln_2)
            h, x = self.add_norm(h, block.mlp(x), next_norm)
        return self.out_proj(x)  # (B, [K,] D)

    def _fused_blocks(self, h: torch.Tensor, condition: ConditionStates | None) -> torch.Tensor:
        """The blocks and the output on the residual stream h (B, [K,] d), every matmul one fused_linear launch."""
        fused_linear = self.linear
        for i, (block, w) in enumerate(zip(self.blocks, self.block_linears)):
            if self.config.latent_tokens == 1:  # attention over one token: its folded value/output projection
                h = fused_linear(h, w["value_out"], norm=block.ln_1, residual=h)
            else:
                qkv = fused_linear(h, w["qkv"], norm=block.ln_1)  # (B, K, 3d)
                h = fused_linear(block.attn.mix(qkv), w["proj"], residual=h)
            if condition is not None:
                q = fused_linear(h, w["cross_q"], norm=block.ln_cross)
                y = block.cross.mix(q, *condition.keys_values[i], condition.mask)
                h = fused_linear(y, w["cross_proj"], residual=h)
            up = fused_linear(h, w["up"], norm=block.ln_2, gelu=True)
            h = fused_linear(up, w["down"], residual=h)
        return fused_linear(h, self.out_proj, norm=self.ln_f)  # (B, [K,] D)
