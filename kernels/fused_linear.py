"""A linear layer with its neighbours fused in, one Triton kernel: out = act(norm(x) @ W^T + b) + residual.

A pre-norm transformer block is LayerNorm -> matmul -> (GELU) -> matmul -> residual add, twice. At the engine's
sampling shapes (1-256 rows, d_model 768, FFN 3072) every one of those is a launch of its own, and the matmuls
are too small to fill the GPU. Here the layer norm is the matmul's prologue (each program takes its rows'
mean and variance in a first pass over x, then normalizes each tile of x as it loads it: x is rows x K, small
beside W), and the bias, the GELU (exact, or GPT-2's tanh form) and the residual add are its epilogue, so a block is three
launches: [LN1 -> attention's folded value/output matmul -> + residual], [LN2 -> up-projection -> GELU],
[down-projection -> + residual]. With few rows the grid over (rows, columns) leaves most multiprocessors idle:
SPLIT_K > 1 adds a third grid axis over K, each program adding its partial sum into an fp32 output with an
atomic add (bias and residual added once, by the first split); a GELU, being nonlinear, needs the whole sum, so
it runs unsplit.

Accumulation is fp32 whatever the storage dtype, fp32 inputs multiply in IEEE fp32 (no TF32: fp32 is the
parity mode). With an Fp8Linear the weight is read as float8 e4m3 (a byte an element: half of bf16's traffic,
which is what bounds these small-row products), widened to the activations' dtype in registers (exact: e4m3's
values are all bf16, fp16 and fp32 values), and each output column's sum multiplied by its scale before the bias.
Set TRITON_INTERPRET=1 before triton is imported to run it on CPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .tile_table import shape_key, tuned


@triton.jit
def row_norm_stats(x_rows, row_ok, K, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(mean, 1 / std) over K of each row at x_rows (BLOCK_M, 1) pointers, in fp32, as torch's LayerNorm: two
    passes over the rows (x is rows x K, small beside a weight)."""
    ks = tl.arange(0, BLOCK_K)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (k0 + ks < K)[None, :]
        total += tl.sum(tl.load(x_rows + k0 + ks[None, :], mask=mask, other=0.0).to(tl.float32), axis=1)
    mean = total / K
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_ok[:, None] & (k0 + ks < K)[None, :]
        x = tl.load(x_rows + k0 + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        centered = tl.where(mask, x - mean[:, None], 0.0)
        squares += tl.sum(centered * centered, axis=1)
    return mean, 1.0 / tl.sqrt(squares / K + eps)


@triton.jit
def normed_tile(x, x_mask, k, k_ok, mean, rstd, ln_w_ptr, ln_b_ptr):
    """A tile x (BLOCK_M, BLOCK_K) of the rows at columns k, layer-normed and stored as torch stores a norm's
    output: in the storage dtype (masked entries zero)."""
    g = tl.load(ln_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    beta = tl.load(ln_b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    normed = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :]
    return tl.where(x_mask, normed, 0.0).to(x.dtype)


@triton.jit
def _fused_linear_kernel(
    x_ptr, w_ptr, w_scale_ptr, b_ptr, ln_w_ptr, ln_b_ptr, res_ptr, out_ptr,  # x (M, K); w (N, K) or (K, N); b (N,)
    M, N, K, eps,  # res, out: (M, N); rows of x, res, out contiguous, `stride_*m` elements apart
    stride_xm, stride_wn, stride_wk, stride_rm, stride_om,  # w[n, k] at n * stride_wn + k * stride_wk
    LN: tl.constexpr, GELU: tl.constexpr, TANH: tl.constexpr, RESIDUAL: tl.constexpr, SPLIT_K: tl.constexpr,
    W_SCALE: tl.constexpr,  # w is float8 with an fp32 scale per output column at w_scale_ptr (N,); ln_* (K,)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,  # widen both operands to fp32 before the product (the CPU interpreter: see launch)
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    x_rows = x_ptr + rows[:, None] * stride_xm  # (BLOCK_M, 1)
    if LN:
        mean, rstd = row_norm_stats(x_rows, row_ok, K, eps, BLOCK_M, BLOCK_K)
    # this program's share of K: all of it, or one of SPLIT_K slices of whole BLOCK_K tiles
    k_len = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_len
    k_end = tl.minimum(k_begin + k_len, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + ks
        k_ok = k < k_end
        x_mask = row_ok[:, None] & k_ok[None, :]
        x = tl.load(x_rows + k[None, :], mask=x_mask, other=0.0)  # (BLOCK_M, BLOCK_K)
        if LN:
            x = normed_tile(x, x_mask, k, k_ok, mean, rstd, ln_w_ptr, ln_b_ptr)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N): W^T's tile
        if W_SCALE:  # float8 codes, widened exactly; the scale comes after the sum
            w = w.to(x_ptr.dtype.element_ty)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w, input_precision="ieee")
    if W_SCALE:  # each split scales its own partial sum: the scale distributes over the sum
        acc *= tl.load(w_scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    first = pid_k == 0  # the split that adds the bias and the residual
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc += tl.where(first, bias, 0.0)[None, :]
    if GELU:  # only unsplit (the launch checks)
        if TANH:  # GPT-2's gelu_new: x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), tanh(u) = 1 - 2 / (e^2u + 1)
            u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = 0.5 * acc * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        else:  # exact GELU, as nn.GELU(): x / 2 (1 + erf(x / sqrt 2))
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    out_mask = row_ok[:, None] & col_ok[None, :]
    if RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=out_mask, other=0.0)
        acc += tl.where(first, res.to(tl.float32), 0.0)
    out = out_ptr + rows[:, None] * stride_om + cols[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out, acc, mask=out_mask)  # fp32 output, zeroed by the launch


@dataclass(frozen=True)
class Tiles:
    """A launch's tiling: rows and columns a program, K a loop step, K slices (split-K); warps a program and
    software-pipeline stages (Triton's num_warps and num_stages)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def default_tiles(M: int, N: int, K: int, *, device: torch.device, gelu: bool | str,
                  multiprocessors: int | None = None, dtype: torch.dtype = torch.float32, fp8: bool = False,
                  gpu: str | None = None) -> Tiles:
    """Tiles for an (M, K) x (K, N) product. On a GPU: the tiling bench/gpu/tune_tiles.py stored for this GPU model
    and shape (kernels/tiles.json, by `gpu`, default the device's name), else 16-64 rows a program (tl.dot's
    minimum is 16), 64 columns, and split-K when the (rows, columns) grid would leave most of the GPU's
    multiprocessors idle (`multiprocessors`, default the device's: 132 on an H200). In Triton's CPU
    interpreter, which runs programs one after another as whole-array operations: as few programs as possible."""
    if device.type != "cuda":
        return Tiles(max(16, triton.next_power_of_2(min(M, 64))), min(128, triton.next_power_of_2(N)), 64)
    key = shape_key(M, N, K, dtype=str(dtype).removeprefix("torch."), gelu=gelu, weights="fp8" if fp8 else "same")
    stored = tuned("fused_linear", gpu or _gpu_name(device), key)
    if stored is not None and not (gelu and stored["split_k"] > 1):
        return Tiles(**{field: stored[field] for field in Tiles.__dataclass_fields__ if field in stored})
    block_m = min(64, max(16, triton.next_power_of_2(M)))
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, 64)
    multiprocessors = multiprocessors or _multiprocessors(device)
    split = 1 if gelu else max(1, min(8, multiprocessors // tiles, K // 256))
    return Tiles(block_m, 64, 64, split)


GELUS = (False, True, "tanh")  # none, the exact (erf) GELU, the tanh approximation (GPT-2's gelu_new)


FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class Fp8Linear(torch.nn.Module):
    """A linear layer whose weight is stored in float8 e4m3 with an fp32 scale per output channel:
    W[n, k] ~ scale[n] * code[n, k], scale[n] = max_k |W[n, k]| / 448 (e4m3's largest value), so each row uses the
    format's whole range. The bias stays in the layer's dtype. fused_linear reads the codes; forward() is the same
    function in torch (the dequantized weight, one matmul), the reference the kernel is tested against."""

    @torch.no_grad()
    def __init__(self, linear: torch.nn.Module):
        """linear: an nn.Linear or a GPT-2 Conv1D (stored here in nn.Linear's (N, K) layout either way)."""
        super().__init__()
        weight, N, K, _, _ = _weight(linear)
        rows = (weight if isinstance(linear, torch.nn.Linear) else weight.T).float()  # (N, K)
        scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / FP8_MAX  # (N,)
        self.in_features, self.out_features, self.dtype = K, N, weight.dtype
        self.register_buffer("weight", (rows / scale[:, None]).to(FP8).contiguous())  # (N, K) codes
        self.register_buffer("scale", scale)  # (N,) fp32
        bias = linear.bias if linear.bias is not None else torch.zeros(N, dtype=weight.dtype, device=weight.device)
        self.register_buffer("bias", bias.detach().clone())

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) the weight the codes stand for, in the layer's dtype."""
        return (self.weight.float() * self.scale[:, None]).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(), self.bias)


def _weight(linear: torch.nn.Module) -> tuple[torch.Tensor, int, int, int, int]:
    """(weight, N, K, stride_n, stride_k) of an nn.Linear or Fp8Linear (weight (N, K)) or a GPT-2 Conv1D
    (weight (K, N))."""
    weight = linear.weight
    if isinstance(linear, (torch.nn.Linear, Fp8Linear)):
        return weight, weight.shape[0], weight.shape[1], weight.stride(0), weight.stride(1)
    from transformers.pytorch_utils import Conv1D

    if isinstance(linear, Conv1D):
        return weight, weight.shape[1], weight.shape[0], weight.stride(1), weight.stride(0)
    raise TypeError(f"fused_linear takes an nn.Linear, an Fp8Linear or a GPT-2 Conv1D, got {type(linear).__name__}")


def fused_linear(x: torch.Tensor, linear: torch.nn.Module, *, norm: torch.nn.LayerNorm | None = None,
                 gelu: bool | str = False, residual: torch.Tensor | None = None,
                 tiles: Tiles | None = None) -> torch.Tensor:
    """act(norm(x) @ W^T + b) + residual, one launch.

    x: (..., K); linear: an nn.Linear, a GPT-2 Conv1D (its weight stored (K, N)) or an Fp8Linear (float8
    codes and their scales; x in its bias's dtype), without a bias adding none; norm: an affine LayerNorm over K, applied first (None: none); gelu: False, True (the exact GELU) or
    "tanh" (its tanh approximation), after the bias; residual: (..., N) added last (None: none). Tensors on one
    device in one dtype, rows contiguous. Returns (..., N) in x's dtype."""
    if gelu not in GELUS:
        raise ValueError(f"gelu must be one of {GELUS}, got {gelu!r}")
    weight, N, K, stride_n, stride_k = _weight(linear)
    bias = linear.bias if linear.bias is not None else torch.zeros(N, dtype=weight.dtype, device=weight.device)
    if x.shape[-1] != K:
        raise ValueError(f"x's last dimension is {x.shape[-1]}, the linear layer takes {K}")
    if norm is not None and (tuple(norm.normalized_shape) != (K,) or norm.weight is None or norm.bias is None):
        raise ValueError(f"norm must be an affine LayerNorm over the last dimension ({K}), got {norm}")
    lead = x.shape[:-1]
    if residual is not None and residual.shape != (*lead, N):
        raise ValueError(f"residual must be {(*lead, N)}, got {tuple(residual.shape)}")
    fp8 = isinstance(linear, Fp8Linear)
    tensors = [x, bias if fp8 else weight, bias, *([] if norm is None else [norm.weight, norm.bias]),
               *([] if residual is None else [residual])]
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        raise ValueError(f"x, the weights and the residual must share a dtype and device, got "
                         f"{sorted({(str(t.dtype), str(t.device)) for t in tensors})}")
    x2 = x.reshape(-1, K)
    res2 = None if residual is None else residual.reshape(-1, N)
    if x2.stride(-1) != 1 or 1 not in (stride_n, stride_k) or (res2 is not None and res2.stride(-1) != 1):
        raise ValueError("x, the weight and the residual need contiguous rows (call .contiguous())")
    M = x2.shape[0]
    tiles = tiles or default_tiles(M, N, K, device=x.device, gelu=gelu, dtype=x.dtype, fp8=fp8)
    if gelu and tiles.split_k > 1:
        raise ValueError("a GELU needs the whole sum: split_k must be 1 with gelu=True")
    split = tiles.split_k > 1
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device) if split else torch.empty(M, N, dtype=x.dtype,
                                                                                             device=x.device)
    grid = (triton.cdiv(M, tiles.block_m), triton.cdiv(N, tiles.block_n), tiles.split_k)
    _fused_linear_kernel[grid](
        x2, weight, linear.scale if fp8 else bias, bias,
        norm.weight if norm is not None else bias, norm.bias if norm is not None else bias,
        res2 if res2 is not None else out, out, M, N, K, norm.eps if norm is not None else 0.0,
        x2.stride(0), stride_n, stride_k, res2.stride(0) if res2 is not None else 0, out.stride(0),
        LN=norm is not None, GELU=bool(gelu), TANH=gelu == "tanh", RESIDUAL=residual is not None, SPLIT_K=tiles.split_k,
        W_SCALE=fp8,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        # Triton 3.9's interpreter multiplies bf16 tiles as raw bits; widened, their products are exact in fp32
        # and summed in fp32, as a GPU's bf16 MMA does (up to the order of the sum)
        DOT_FP32=not x.is_cuda, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return out.to(x.dtype).view(*lead, N)
