"""Masked learnable-key attention in Triton: forward and backward kernels with their launchers.

Shapes: q (B,H,L,d); k (H,L,d) shared by the batch (indexed without a batch stride);
v (B,H,L,d); out (B,H,L,d); lse (B,H,L) fp32. With s[i,j] = q[b,n,i].k[n,j] / sqrt(d)::

    out[b,n,i] = sum_{j not in W(i)} P[i,j] v[b,n,j],   P[i,.] = softmax_{j not in W(i)} s[i,.]
    lse[b,n,i] = log sum_{j not in W(i)} exp s[i,j]

Flash-attention style: each program owns a block of queries and streams every key block
through an online softmax. Only the key blocks that overlap the grid rows within k//2 of the
query block can hold window keys, so the loop is split in three ranges and the window mask
is computed only in the middle one. No L x L mask is ever built.

Backward (delta = rowsum(dO * out)):
    dS = P * (dO v^T - delta)     dq = scale * dS k     dv[b] = P^T dO     dk = scale * sum_b dS^T q
dq per query block; dk, dv per key block, looping over the batch (dv stored per sample,
dk accumulated across samples: no atomics; optional batch splits write fp32 partials).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..window import reach
from .utils import (LOG2E, batch_splits, block_config, check_dtype, device_guard, dkdv_step, dot_precision,
                    dq_step, in_window, launch, launch_meta, launch_target, mma, row_dot, rows_in_reach,
                    softmax_step, softmax_total)


@triton.jit
def _window_ranges(start, BLOCK: tl.constexpr, OTHER_BLOCK: tl.constexpr, L, WIDTH, HEIGHT, HALF):
    """[lo, hi): the tokens of the rows within HALF rows of tokens [start, start+BLOCK), widened
    to multiples of OTHER_BLOCK so that the loops over [0, lo) and [hi, L) need no window mask."""
    lo, hi = rows_in_reach(start, BLOCK, L, WIDTH, HEIGHT, HALF)
    lo = (lo // OTHER_BLOCK) * OTHER_BLOCK
    hi = tl.minimum(tl.cdiv(hi, OTHER_BLOCK) * OTHER_BLOCK, L)
    return lo, hi


@triton.jit
def _masked_fwd_loop(
    acc, l_i, m_i, q, row_q, col_q, K, V, k_base, v_base, start, end, offs_d, valid_d,
    qk_scale, L, WIDTH, HALF, D,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax update over key blocks [start, end); WINDOW masks out window keys."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid_n = offs_n < L
        kv_offs = offs_n[:, None] * D + offs_d[None, :]
        kv_mask = valid_n[:, None] & valid_d[None, :]
        k = tl.load(K + k_base + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(V + v_base + kv_offs, mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), PRECISION) * qk_scale
        keep = valid_n[None, :]
        if WINDOW:
            keep = keep & ~in_window(row_q, col_q, offs_n // WIDTH, offs_n % WIDTH, HALF)
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, tl.where(keep, s, float("-inf")), v, PRECISION)
    return acc, l_i, m_i


@triton.jit
def _masked_fwd_kernel(
    Q, K, V, Out, Lse,
    qk_scale, H, L, WIDTH, HEIGHT, HALF, D,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    n = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid_m = offs_m < L
    valid_d = offs_d < D
    row_q = offs_m // WIDTH
    col_q = offs_m % WIDTH
    q_base = bh.to(tl.int64) * L * D
    k_base = n.to(tl.int64) * L * D
    q_offs = q_base + offs_m[:, None] * D + offs_d[None, :]
    q_mask = valid_m[:, None] & valid_d[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    lo, hi = _window_ranges(pid_m * BLOCK_M, BLOCK_M, BLOCK_N, L, WIDTH, HEIGHT, HALF)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _masked_fwd_loop(acc, l_i, m_i, q, row_q, col_q, K, V, k_base, q_base, 0, lo, offs_d,
                                     valid_d, qk_scale, L, WIDTH, HALF, D, False, PRECISION, BLOCK_N)
    acc, l_i, m_i = _masked_fwd_loop(acc, l_i, m_i, q, row_q, col_q, K, V, k_base, q_base, lo, hi, offs_d,
                                     valid_d, qk_scale, L, WIDTH, HALF, D, True, PRECISION, BLOCK_N)
    acc, l_i, m_i = _masked_fwd_loop(acc, l_i, m_i, q, row_q, col_q, K, V, k_base, q_base, hi, L, offs_d,
                                     valid_d, qk_scale, L, WIDTH, HALF, D, False, PRECISION, BLOCK_N)
    # Validation guarantees every real query a key outside its window (l_i > 0).
    l_safe, lse = softmax_total(l_i, m_i)
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=valid_m)
    tl.store(Out + q_offs, (acc / l_safe[:, None]).to(Out.dtype.element_ty), mask=q_mask)


@triton.jit
def _masked_bwd_dq_loop(
    dq, q, do, lse2, delta, row_q, col_q, valid_m, K, V, k_base, v_base, start, end, offs_d, valid_d,
    qk_scale, L, WIDTH, HALF, D,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid_n = offs_n < L
        kv_offs = offs_n[:, None] * D + offs_d[None, :]
        kv_mask = valid_n[:, None] & valid_d[None, :]
        k = tl.load(K + k_base + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(V + v_base + kv_offs, mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), PRECISION) * qk_scale
        keep = valid_n[None, :] & valid_m[:, None]
        if WINDOW:
            keep = keep & ~in_window(row_q, col_q, offs_n // WIDTH, offs_n % WIDTH, HALF)
        dq = dq_step(dq, s, keep, lse2, delta, do, k, v, PRECISION)
    return dq


@triton.jit
def _masked_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    sm_scale, qk_scale, H, L, WIDTH, HEIGHT, HALF, D,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq[b,n,i] = scale * sum_{j not in W(i)} P[i,j] (dO_i . v[b,n,j] - delta_i) k[n,j]."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    n = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid_m = offs_m < L
    valid_d = offs_d < D
    row_q = offs_m // WIDTH
    col_q = offs_m % WIDTH
    q_base = bh.to(tl.int64) * L * D
    k_base = n.to(tl.int64) * L * D
    q_offs = q_base + offs_m[:, None] * D + offs_d[None, :]
    q_mask = valid_m[:, None] & valid_d[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
    lse2 = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=valid_m, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=valid_m, other=0.0)
    lo, hi = _window_ranges(pid_m * BLOCK_M, BLOCK_M, BLOCK_N, L, WIDTH, HEIGHT, HALF)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _masked_bwd_dq_loop(dq, q, do, lse2, delta, row_q, col_q, valid_m, K, V, k_base, q_base, 0, lo,
                             offs_d, valid_d, qk_scale, L, WIDTH, HALF, D, False, PRECISION, BLOCK_N)
    dq = _masked_bwd_dq_loop(dq, q, do, lse2, delta, row_q, col_q, valid_m, K, V, k_base, q_base, lo, hi,
                             offs_d, valid_d, qk_scale, L, WIDTH, HALF, D, True, PRECISION, BLOCK_N)
    dq = _masked_bwd_dq_loop(dq, q, do, lse2, delta, row_q, col_q, valid_m, K, V, k_base, q_base, hi, L,
                             offs_d, valid_d, qk_scale, L, WIDTH, HALF, D, False, PRECISION, BLOCK_N)
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _masked_bwd_dkdv_loop(
    dk, dv, k, v, row_k, col_k, valid_n, Q, DO, Lse, Delta, q_base, lse_base, start, end, offs_d, valid_d,
    qk_scale, L, WIDTH, HALF, D,
    WINDOW: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        valid_m = offs_m < L
        q_offs = q_base + offs_m[:, None] * D + offs_d[None, :]
        q_mask = valid_m[:, None] & valid_d[None, :]
        q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
        do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
        lse2 = tl.load(Lse + lse_base + offs_m, mask=valid_m, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + lse_base + offs_m, mask=valid_m, other=0.0)
        s_t = mma(k, tl.trans(q), PRECISION) * qk_scale  # (keys, queries)
        keep = valid_m[None, :] & valid_n[:, None]
        if WINDOW:
            keep = keep & ~in_window(row_k, col_k, offs_m // WIDTH, offs_m % WIDTH, HALF)
        dk, dv = dkdv_step(dk, dv, s_t, keep, lse2, delta, q, do, v, PRECISION)
    return dk, dv


@triton.jit
def _masked_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    sm_scale, qk_scale, B, H, L, WIDTH, HEIGHT, HALF, D, SPLITS,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dv[b,n,j] = sum_{i : j not in W(i)} P[i,j] dO_i for b = split, split + SPLITS, ...;
    dk[n,j] summed over those samples into partial sum number ``split`` of DK."""
    n = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    valid_n = offs_n < L
    valid_d = offs_d < D
    row_k = offs_n // WIDTH
    col_k = offs_n % WIDTH
    kv_offs = offs_n[:, None] * D + offs_d[None, :]
    kv_mask = valid_n[:, None] & valid_d[None, :]
    k_base = n.to(tl.int64) * L * D
    k = tl.load(K + k_base + kv_offs, mask=kv_mask, other=0.0)
    # The window relation is symmetric: queries near these keys' rows are the masked ones.
    lo, hi = _window_ranges(pid_n * BLOCK_N, BLOCK_N, BLOCK_M, L, WIDTH, HEIGHT, HALF)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for b in range(split, B, SPLITS):
        q_base = (b * H + n).to(tl.int64) * L * D
        lse_base = (b * H + n).to(tl.int64) * L
        v = tl.load(V + q_base + kv_offs, mask=kv_mask, other=0.0)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dk, dv = _masked_bwd_dkdv_loop(dk, dv, k, v, row_k, col_k, valid_n, Q, DO, Lse, Delta, q_base, lse_base,
                                       0, lo, offs_d, valid_d, qk_scale, L, WIDTH, HALF, D, False, PRECISION,
                                       BLOCK_M)
        dk, dv = _masked_bwd_dkdv_loop(dk, dv, k, v, row_k, col_k, valid_n, Q, DO, Lse, Delta, q_base, lse_base,
                                       lo, hi, offs_d, valid_d, qk_scale, L, WIDTH, HALF, D, True, PRECISION,
                                       BLOCK_M)
        dk, dv = _masked_bwd_dkdv_loop(dk, dv, k, v, row_k, col_k, valid_n, Q, DO, Lse, Delta, q_base, lse_base,
                                       hi, L, offs_d, valid_d, qk_scale, L, WIDTH, HALF, D, False, PRECISION,
                                       BLOCK_M)
        tl.store(DV + q_base + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)
    dk_offs = (split * H + n).to(tl.int64) * L * D + kv_offs
    tl.store(DK + dk_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)


def masked_forward(q, k, v, height, width, window, *, block_m=None, block_n=None):
    """q (B,H,L,d), k (H,L,d), v (B,H,L,d) contiguous -> out (B,H,L,d), lse (B,H,L) fp32."""
    check_dtype(q)
    B, H, L, d = q.shape
    cfg = block_config("masked_fwd", d, q.dtype, launch_target(q.device), block_m, block_n)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    with device_guard(q):
        launch(_masked_fwd_kernel, (B * H, triton.cdiv(L, cfg.block_m)),
               q, k, v, out, lse, LOG2E / math.sqrt(d), H, L, width, height, reach(window), d,
               PRECISION=dot_precision(q.dtype), **launch_meta(cfg))
    return out, lse


def masked_backward(q, k, v, out, lse, grad_out, height, width, window, *, block_m=None, block_n=None,
                    splits=None):
    """Gradients of masked_forward: dq (B,H,L,d), dk (H,L,d) summed over the batch, dv (B,H,L,d)."""
    check_dtype(q)
    B, H, L, d = q.shape
    target = launch_target(q.device)
    dq_cfg, dkdv_cfg = (block_config(kernel, d, q.dtype, target, block_m, block_n)
                        for kernel in ("masked_dq", "masked_dkdv"))
    sm_scale = 1.0 / math.sqrt(d)
    scalars = (H, L, width, height, reach(window), d)
    precision = dot_precision(q.dtype)
    key_tiles = triton.cdiv(L, dkdv_cfg.block_n)
    n_splits = batch_splits(B, H * key_tiles, target, splits)
    with device_guard(q):
        delta = row_dot(out, grad_out)
        dq = torch.empty_like(q)
        launch(_masked_bwd_dq_kernel, (B * H, triton.cdiv(L, dq_cfg.block_m)),
               q, k, v, grad_out, lse, delta, dq, sm_scale, sm_scale * LOG2E, *scalars,
               PRECISION=precision, **launch_meta(dq_cfg))
        dv = torch.empty_like(v)
        dk = torch.empty_like(k) if n_splits == 1 else torch.empty((n_splits, *k.shape), device=k.device,
                                                                    dtype=torch.float32)
        launch(_masked_bwd_dkdv_kernel, (H, key_tiles, n_splits),
               q, k, v, grad_out, lse, delta, dk, dv, sm_scale, sm_scale * LOG2E, B, *scalars, n_splits,
               PRECISION=precision, **launch_meta(dkdv_cfg))
    if n_splits > 1:
        dk = dk.sum(0).to(k.dtype)
    return dq, dk, dv
