"""Pieces shared by the Triton kernels of both ops: launch configuration, dtype rules, the
window rule on the token grid and the row-wise ``delta = rowsum(dO * O)`` of the backward.

Tokens are numbered row-major on the h x w grid: token t sits at row t // w, column t % w.
Every kernel works in the log2 domain (``exp2``), with ``qk_scale = log2(e) / sqrt(d)``; the
``lse`` tensors handed back to the dispatcher are natural-log, as its contract says.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_dtype(t: torch.Tensor) -> None:
    # lse is fp32 by contract, so a float64 call could not be computed to float64 accuracy.
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the triton backend takes float16, bfloat16 or float32 inputs, got {t.dtype}; "
            f"use backend='reference' (or 'cpp') for {t.dtype}"
        )


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision of fp32 operands, following ``torch.set_float32_matmul_precision``:
    "highest" (torch's default) -> "tf32x3", three TF32 tensor-core products that recover fp32
    accuracy (plain IEEE fp32 dots run on CUDA cores and spill registers); "high"/"medium" ->
    single TF32. fp16/bf16 operands ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


@dataclass(frozen=True)
class GpuTarget:
    """The GPU a launch is configured for: compute capability as major * 10 + minor (80: A100,
    90: H100/H200, 100: B200) and its number of SMs. Launches on a real GPU ask ``of(device)``;
    ahead-of-time builds (``rlr_kernels/triton/aot.py``) name one, no device needed."""

    capability: int
    sms: int

    @classmethod
    def of(cls, device: torch.device) -> "GpuTarget":
        props = torch.cuda.get_device_properties(device)
        return cls(props.major * 10 + props.minor, props.multi_processor_count)


A100 = GpuTarget(80, 108)
H100 = GpuTarget(90, 132)   # SXM5; the H200 has the same SMs
B200 = GpuTarget(100, 148)


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes of one kernel launch. ``block_m`` tiles queries, ``block_n`` keys; ``block_d``
    is the head dim rounded up to a power of two (>= 16, the smallest ``tl.dot`` operand)."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


# The Triton kernels by launch role: the forward, the backward's delta (local op with R > 1), dq
# and dk/dv passes of each op. ``block_config`` is asked per role.
KERNEL_ROLES = ("local_fwd", "local_delta", "local_dq", "local_dkdv", "masked_fwd", "masked_dq", "masked_dkdv")

# GPU launch configurations (BLOCK_M, BLOCK_N, warps, stages) per kernel role and input width, for
# BLOCK_D = 16, 32, 64 and >= 128: tiles that compile without a register spill for sm_80, sm_90 and
# sm_100 with Triton 3.6 and 3.8, the largest (or the best occupancy) among those tried. Left to
# itself, ptxas caps a kernel at the register count of a higher occupancy (96, 128 or 168: 5, 2 or
# 3 blocks of 4 or 8 warps) and spills what does not fit, so a kernel that needs a few registers
# more than a cap gets a smaller tile or another warp count instead. fp32 inputs run every dot as
# three TF32 products, which keeps a high and a low part of each operand live: smaller tiles, and
# still a few spilling builds. tools/kernel_resources.py compiles and inspects every one;
# tests/test_gpu_builds.py fails on a spill in a 16-bit build. Chosen from static builds, not GPU
# timings: none was available.
GPU_TILES = {
    ("local_fwd", 16): ((128, 32, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 8, 3)),
    ("masked_fwd", 16): ((64, 64, 4, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 64, 8, 3)),
    ("local_delta", 16): ((64, 32, 8, 2), (64, 32, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)),
    ("local_dq", 16): ((64, 32, 8, 2), (64, 32, 8, 2), (64, 32, 8, 2), (64, 32, 8, 2)),
    ("masked_dq", 16): ((64, 32, 8, 2), (64, 32, 8, 2), (64, 32, 8, 2), (64, 32, 8, 2)),
    ("local_dkdv", 16): ((16, 64, 4, 2), (64, 32, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)),
    ("masked_dkdv", 16): ((64, 32, 8, 2), (32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)),
    ("local_fwd", 32): ((64, 32, 4, 2), (64, 32, 4, 2), (32, 32, 8, 2), (32, 16, 8, 2)),
    ("masked_fwd", 32): ((64, 32, 4, 2), (64, 32, 4, 2), (32, 32, 8, 2), (32, 32, 8, 2)),
    ("local_delta", 32): ((64, 32, 4, 2), (64, 32, 4, 2), (32, 32, 8, 2), (32, 16, 8, 2)),
    ("local_dq", 32): ((32, 16, 8, 2), (32, 16, 8, 2), (32, 16, 8, 2), (32, 16, 8, 2)),
    ("masked_dq", 32): ((32, 16, 8, 2), (32, 16, 8, 2), (32, 16, 8, 2), (32, 16, 8, 2)),
    ("local_dkdv", 32): ((32, 16, 4, 2), (32, 16, 4, 2), (32, 16, 4, 2), (16, 16, 8, 2)),
    ("masked_dkdv", 32): ((32, 16, 4, 2), (32, 16, 4, 2), (32, 16, 4, 2), (16, 16, 8, 2)),
}


def block_config(kernel: str, head_dim: int, dtype: torch.dtype, target: GpuTarget | None,
                 block_m: int | None = None, block_n: int | None = None) -> BlockConfig:
    """Tiles, warps and pipeline stages of one kernel (a ``KERNEL_ROLES`` name) on ``target`` (None:
    the interpreter). No autotuning: results are deterministic and there is no first-call
    benchmark. Explicit ``block_m`` / ``block_n`` override the tiles (tests use this to force many
    tiles on tiny inputs)."""
    if kernel not in KERNEL_ROLES:
        raise ValueError(f"kernel must be one of {KERNEL_ROLES}, got {kernel!r}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    if target is None:
        # Interpreter: each op costs Python overhead regardless of size, so few large tiles
        # are fastest; 32 still splits the test grids into several tiles.
        bm, bn, warps, stages = 32, 32, 4, 1
    else:
        width = 32 if dtype == torch.float32 else 16
        bm, bn, warps, stages = GPU_TILES[kernel, width][{16: 0, 32: 1, 64: 2}.get(block_d, 3)]
    bm = block_m or bm
    bn = block_n or bn
    for name, value in (("block_m", bm), ("block_n", bn)):
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    return BlockConfig(bm, bn, block_d, warps, stages)


def launch_meta(cfg: BlockConfig) -> dict:
    """The launch keywords of a config: the three tile constexprs, warps and pipeline stages."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)


def batch_splits(batch: int, programs: int, target: GpuTarget | None, requested: int | None = None) -> int:
    """How many programs share the batch reduction of one key tile in the dk/dv kernels.

    Each split writes its own fp32 partial sum and the partials are added afterwards, which
    keeps the result deterministic (no atomics). On a GPU, split until there are about two
    programs per SM; on the interpreter (``target`` None), do not split.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"batch_splits must be >= 1, got {requested}")
        return min(requested, batch)
    if target is None:
        return 1
    return max(1, min(batch, math.ceil(2 * target.sms / max(programs, 1))))


@dataclass(frozen=True)
class Launch:
    """One kernel launch as a launcher issues it: ``kernel[grid](*args, **meta)``."""

    kernel: object
    grid: tuple
    args: tuple
    meta: dict


# Set by ``capture``: the target the launchers configure for, and the list their launches go to.
_CAPTURE: contextvars.ContextVar = contextvars.ContextVar("rlr_triton_capture", default=None)


@contextlib.contextmanager
def capture(target: GpuTarget):
    """Within this block the launchers configure their kernels for ``target`` and record their
    launches in the yielded list instead of running them (call them with ``meta`` tensors): what
    ``aot.py`` compiles is exactly what they would launch on that GPU."""
    launches: list = []
    token = _CAPTURE.set((target, launches))
    try:
        yield launches
    finally:
        _CAPTURE.reset(token)


def launch_target(device: torch.device) -> GpuTarget | None:
    """The GPU the launchers configure for: the captured target, the tensors' GPU, or None on
    the interpreter."""
    captured = _CAPTURE.get()
    if captured is not None:
        return captured[0]
    return GpuTarget.of(device) if device.type == "cuda" else None


def launch(kernel, grid: tuple, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)``, or its record while ``capture`` is active."""
    captured = _CAPTURE.get()
    if captured is None:
        kernel[grid](*args, **meta)
    else:
        captured[1].append(Launch(kernel, tuple(grid), args, meta))


def device_guard(t: torch.Tensor):
    """Launch on the tensor's GPU, not on whichever GPU is current."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# Triton's interpreter multiplies the raw bits of bfloat16 ``tl.dot`` operands
# (triton-lang/triton#11584; bf16 is unsupported there), so under it they are widened first.
_WIDEN_BF16_DOT = tl.constexpr(interpreting())


@triton.jit
def mma(a, b, PRECISION: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation. Widening bf16 operands to fp32 is exact
    (products of bf16 values are exact in fp32), so the interpreter matches the GPU."""
    if _WIDEN_BF16_DOT:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


# The window rule inside the kernels, which cannot call Python: the device twin of
# rlr_kernels/window.py (HALF = window.reach(k)), tested against it in tests/test_triton.py.


@triton.jit
def in_window(row_a, col_a, row_b, col_b, HALF):
    """(A, B) bool: token b lies in the window of token a (the relation is symmetric)."""
    near_rows = tl.abs(row_a[:, None] - row_b[None, :]) <= HALF
    near_cols = tl.abs(col_a[:, None] - col_b[None, :]) <= HALF
    return near_rows & near_cols


@triton.jit
def rows_in_reach(start, BLOCK: tl.constexpr, L, WIDTH, HEIGHT, HALF):
    """Token range [lo, hi) of the grid rows within HALF rows of tokens [start, start+BLOCK): the
    only tokens whose windows can meet those tokens."""
    first_row = start // WIDTH
    last_row = (tl.minimum(start + BLOCK, L) - 1) // WIDTH
    lo = tl.maximum(first_row - HALF, 0) * WIDTH
    hi = tl.minimum(last_row + HALF + 1, HEIGHT) * WIDTH
    return lo, hi


# The softmax pieces both ops share: scores arrive scaled into the log2 domain (qk_scale), -inf
# (forward) or left out by `keep` (backward) for the keys a query does not attend to.


@triton.jit
def softmax_step(acc, l_i, m_i, s, v, PRECISION: tl.constexpr):
    """Online softmax over one key block: running max m_i, sum l_i and unnormalised output acc
    updated with scores s (queries, keys) and values v. A row whose keys so far are all masked
    keeps m = -inf, and m_safe = 0 then avoids the NaN of (-inf) - (-inf)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, PRECISION)
    return acc, l_i, m_new


@triton.jit
def softmax_total(l_i, m_i):
    """(l_safe, lse) at the end of the online softmax: the row sums with the 0 of padded rows made 1
    (real rows always have a key), and the natural-log log-sum-exp the backward reads."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    return l_safe, (m_fin + tl.log2(l_safe)) * 0.6931471805599453  # log2 domain -> natural log


@triton.jit
def dq_step(dq, s, keep, lse2, delta, do, k, v, PRECISION: tl.constexpr):
    """dq += dS k over one key block: P = exp2(s - lse2) where `keep`, dS = P * (dO v^T - delta)."""
    p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
    dp = mma(do, tl.trans(v), PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + mma(ds.to(k.dtype), k, PRECISION)


@triton.jit
def dkdv_step(dk, dv, s_t, keep, lse2, delta, q, do, v, PRECISION: tl.constexpr):
    """dv += P^T dO and dk += dS^T q over one query block, from the transposed scores s_t (keys,
    queries)."""
    p_t = tl.where(keep, tl.exp2(s_t - lse2[None, :]), 0.0)
    dv += mma(p_t.to(do.dtype), do, PRECISION)
    dp_t = mma(v, tl.trans(do), PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += mma(ds_t.to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def _row_dot_kernel(A, B_, Out, L, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # One (row block, leading index) per program: Out[r, i] = sum_d A[r, i, d] * B[r, i, d].
    pid_m = tl.program_id(0)
    base = tl.program_id(1).to(tl.int64) * L
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < L) & (offs_d[None, :] < D)
    ptrs = base * D + offs_m[:, None] * D + offs_d[None, :]
    a = tl.load(A + ptrs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B_ + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + base + offs_m, tl.sum(a * b, axis=1), mask=offs_m < L)


def row_dot(out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """delta (B, H, L) fp32 = rowsum(grad_out * out) for (B, H, L, d) tensors: the softmax
    backward term ``D_i = dO_i . O_i`` of flash attention."""
    B, H, L, d = out.shape
    delta = torch.empty((B, H, L), device=out.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(d))
    block_m = min(64, 4096 // block_d)  # tiles of at most 4096 values: 32 a thread for each operand (4 warps)
    with device_guard(out):
        launch(_row_dot_kernel, (triton.cdiv(L, block_m), B * H), out, grad_out, delta, L, d,
               BLOCK_M=block_m, BLOCK_D=block_d)
    return delta
