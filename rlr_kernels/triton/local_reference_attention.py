"""Local reference attention in Triton: forward and backward kernels with their launchers.

Shapes: q (B,H,L,d); k, v (R,H,L,d), the R reference copies shared by the whole batch;
out (B,H,L,d); lse (B,R,H,L) fp32. With s_c[i,j] = q[b,n,i].k[c,n,j] / sqrt(d)::

    out[b,n,i]   = sum_c sum_{j in W(i)} P_c[i,j] v[c,n,j],   P_c[i,.] = softmax_{j in W(i)} s_c[i,.]
    lse[b,c,n,i] = log sum_{j in W(i)} exp s_c[i,j]

W(i) = {j : |row i - row j| <= k//2 and |col i - col j| <= k//2} (truncated at the border).
Queries are tiled by blocks of consecutive tokens; a block spans a few grid rows, so it only
ever loads the key rows within k//2 of them and masks the columns (and the rows of the
corners) that fall outside each query's window. No L x L mask, no per-sample copy of k, v.

Backward, per copy c (O^c = sum_j P_c v_c, delta_c = rowsum(dO * O^c)):
    dS_c = P_c * (dO v_c^T - delta_c)        dq = scale * sum_c dS_c k_c
    dv_c = sum_b P_c^T dO                    dk_c = scale * sum_b dS_c^T q
dq is computed per query block, dk/dv per key block looping over the batch and the query
rows in reach, so the batch reduction needs no atomics (optionally split over the batch
into fp32 partials that are added afterwards; still deterministic).
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
def _local_fwd_kernel(
    Q, K, V, Out, Lse,
    qk_scale, H, L, WIDTH, HEIGHT, HALF, R, D,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    n = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid_m = offs_m < L
    valid_d = offs_d < D
    row_q = offs_m // WIDTH
    col_q = offs_m % WIDTH
    q_base = bh.to(tl.int64) * L * D
    q_mask = valid_m[:, None] & valid_d[None, :]
    q = tl.load(Q + q_base + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0)
    key_lo, key_hi = rows_in_reach(pid_m * BLOCK_M, BLOCK_M, L, WIDTH, HEIGHT, HALF)

    total = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for c in range(R):
        kv_base = (n + c * H).to(tl.int64) * L * D
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(key_lo, key_hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            valid_n = offs_n < key_hi
            kv_offs = kv_base + offs_n[:, None] * D + offs_d[None, :]
            kv_mask = valid_n[:, None] & valid_d[None, :]
            k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
            s = mma(q, tl.trans(k), PRECISION) * qk_scale
            keep = in_window(row_q, col_q, offs_n // WIDTH, offs_n % WIDTH, HALF) & valid_n[None, :]
            acc, l_i, m_i = softmax_step(acc, l_i, m_i, tl.where(keep, s, float("-inf")), v, PRECISION)
        # Every real query has itself in its window, so l_i > 0; padded rows are not stored.
        l_safe, lse = softmax_total(l_i, m_i)
        total += acc / l_safe[:, None]
        tl.store(Lse + ((b * R + c) * H + n).to(tl.int64) * L + offs_m, lse, mask=valid_m)
    tl.store(Out + q_base + offs_m[:, None] * D + offs_d[None, :], total.to(Out.dtype.element_ty),
             mask=q_mask)


@triton.jit
def _local_bwd_delta_kernel(
    Q, K, V, DO, Lse, Delta,
    qk_scale, H, L, WIDTH, HEIGHT, HALF, R, D,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b,c,n,i] = dO[b,n,i] . O^c[b,n,i] for R > 1, recomputing each copy's output O^c
    from the saved lse (the forward only kept the sum over copies)."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    n = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid_m = offs_m < L
    valid_d = offs_d < D
    row_q = offs_m // WIDTH
    col_q = offs_m % WIDTH
    q_base = bh.to(tl.int64) * L * D
    q_offs = q_base + offs_m[:, None] * D + offs_d[None, :]
    q_mask = valid_m[:, None] & valid_d[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    do = tl.load(DO + q_offs, mask=q_mask, other=0.0).to(tl.float32)
    key_lo, key_hi = rows_in_reach(pid_m * BLOCK_M, BLOCK_M, L, WIDTH, HEIGHT, HALF)

    for c in range(R):
        kv_base = (n + c * H).to(tl.int64) * L * D
        lse_offs = ((b * R + c) * H + n).to(tl.int64) * L + offs_m
        lse2 = tl.load(Lse + lse_offs, mask=valid_m, other=0.0) * 1.4426950408889634  # natural log -> log2
        o_c = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(key_lo, key_hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            valid_n = offs_n < key_hi
            kv_offs = kv_base + offs_n[:, None] * D + offs_d[None, :]
            kv_mask = valid_n[:, None] & valid_d[None, :]
            k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
            s = mma(q, tl.trans(k), PRECISION) * qk_scale
            keep = in_window(row_q, col_q, offs_n // WIDTH, offs_n % WIDTH, HALF)
            keep = keep & valid_n[None, :] & valid_m[:, None]
            p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
            o_c += mma(p.to(v.dtype), v, PRECISION)
        tl.store(Delta + lse_offs, tl.sum(do * o_c, axis=1), mask=valid_m)


@triton.jit
def _local_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    sm_scale, qk_scale, H, L, WIDTH, HEIGHT, HALF, R, D,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq[b,n,i] = scale * sum_c sum_{j in W(i)} P_c[i,j] (dO_i . v_c[j] - delta_c[i]) k_c[j]."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    n = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    valid_m = offs_m < L
    valid_d = offs_d < D
    row_q = offs_m // WIDTH
    col_q = offs_m % WIDTH
    q_base = bh.to(tl.int64) * L * D
    q_offs = q_base + offs_m[:, None] * D + offs_d[None, :]
    q_mask = valid_m[:, None] & valid_d[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
    key_lo, key_hi = rows_in_reach(pid_m * BLOCK_M, BLOCK_M, L, WIDTH, HEIGHT, HALF)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for c in range(R):
        kv_base = (n + c * H).to(tl.int64) * L * D
        lse_offs = ((b * R + c) * H + n).to(tl.int64) * L + offs_m
        lse2 = tl.load(Lse + lse_offs, mask=valid_m, other=0.0) * 1.4426950408889634  # natural log -> log2
        delta = tl.load(Delta + lse_offs, mask=valid_m, other=0.0)
        for start_n in range(key_lo, key_hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            valid_n = offs_n < key_hi
            kv_offs = kv_base + offs_n[:, None] * D + offs_d[None, :]
            kv_mask = valid_n[:, None] & valid_d[None, :]
            k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
            s = mma(q, tl.trans(k), PRECISION) * qk_scale
            keep = in_window(row_q, col_q, offs_n // WIDTH, offs_n % WIDTH, HALF)
            keep = keep & valid_n[None, :] & valid_m[:, None]
            dq = dq_step(dq, s, keep, lse2, delta, do, k, v, PRECISION)
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _local_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    sm_scale, qk_scale, B, H, L, WIDTH, HEIGHT, HALF, R, D, SPLITS,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk_c[j], dv_c[j] summed over the samples b = split, split + SPLITS, ... and the queries
    i with j in W(i). DK / DV hold SPLITS consecutive (R,H,L,d) partial sums."""
    cn = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    c = cn // H
    n = cn % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    valid_n = offs_n < L
    valid_d = offs_d < D
    row_k = offs_n // WIDTH
    col_k = offs_n % WIDTH
    kv_offs = cn.to(tl.int64) * L * D + offs_n[:, None] * D + offs_d[None, :]
    kv_mask = valid_n[:, None] & valid_d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    # The window relation is symmetric: the queries that see these keys are the rows in reach.
    q_lo, q_hi = rows_in_reach(pid_n * BLOCK_N, BLOCK_N, L, WIDTH, HEIGHT, HALF)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for b in range(split, B, SPLITS):
        q_base = (b * H + n).to(tl.int64) * L * D
        lse_base = ((b * R + c) * H + n).to(tl.int64) * L
        for start_m in range(q_lo, q_hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            valid_m = offs_m < q_hi
            q_offs = q_base + offs_m[:, None] * D + offs_d[None, :]
            q_mask = valid_m[:, None] & valid_d[None, :]
            q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
            do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
            lse2 = tl.load(Lse + lse_base + offs_m, mask=valid_m, other=0.0) * 1.4426950408889634  # natural log -> log2
            delta = tl.load(Delta + lse_base + offs_m, mask=valid_m, other=0.0)
            s_t = mma(k, tl.trans(q), PRECISION) * qk_scale  # (keys, queries)
            keep = in_window(row_k, col_k, offs_m // WIDTH, offs_m % WIDTH, HALF)
            keep = keep & valid_m[None, :] & valid_n[:, None]
            dk, dv = dkdv_step(dk, dv, s_t, keep, lse2, delta, q, do, v, PRECISION)
    out_offs = split.to(tl.int64) * R * H * L * D + kv_offs
    tl.store(DK + out_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


def local_forward(q, k, v, height, width, window, *, block_m=None, block_n=None):
    """q (B,H,L,d), k, v (R,H,L,d) contiguous -> out (B,H,L,d), lse (B,R,H,L) fp32."""
    check_dtype(q)
    B, H, L, d = q.shape
    R = k.shape[0]
    cfg = block_config("local_fwd", d, q.dtype, launch_target(q.device), block_m, block_n)
    out = torch.empty_like(q)
    lse = torch.empty((B, R, H, L), device=q.device, dtype=torch.float32)
    with device_guard(q):
        launch(_local_fwd_kernel, (B * H, triton.cdiv(L, cfg.block_m)),
               q, k, v, out, lse, LOG2E / math.sqrt(d), H, L, width, height, reach(window), R, d,
               PRECISION=dot_precision(q.dtype), **launch_meta(cfg))
    return out, lse


def local_backward(q, k, v, out, lse, grad_out, height, width, window, *, block_m=None, block_n=None,
                   splits=None):
    """Gradients of local_forward: dq (B,H,L,d), dk and dv (R,H,L,d) summed over the batch."""
    check_dtype(q)
    B, H, L, d = q.shape
    R = k.shape[0]
    target = launch_target(q.device)
    delta_cfg, dq_cfg, dkdv_cfg = (block_config(kernel, d, q.dtype, target, block_m, block_n)
                                   for kernel in ("local_delta", "local_dq", "local_dkdv"))
    sm_scale = 1.0 / math.sqrt(d)
    scalars = (H, L, width, height, reach(window), R, d)
    precision = dot_precision(q.dtype)
    key_tiles = triton.cdiv(L, dkdv_cfg.block_n)
    n_splits = batch_splits(B, R * H * key_tiles, target, splits)
    with device_guard(q):
        if R == 1:  # the copy's output is the saved output itself
            delta = row_dot(out, grad_out).view(B, 1, H, L)
        else:
            delta = torch.empty_like(lse)
            launch(_local_bwd_delta_kernel, (B * H, triton.cdiv(L, delta_cfg.block_m)),
                   q, k, v, grad_out, lse, delta, sm_scale * LOG2E, *scalars,
                   PRECISION=precision, **launch_meta(delta_cfg))
        dq = torch.empty_like(q)
        launch(_local_bwd_dq_kernel, (B * H, triton.cdiv(L, dq_cfg.block_m)),
               q, k, v, grad_out, lse, delta, dq, sm_scale, sm_scale * LOG2E, *scalars,
               PRECISION=precision, **launch_meta(dq_cfg))
        if n_splits == 1:
            dk, dv = torch.empty_like(k), torch.empty_like(v)
        else:
            dk = torch.empty((n_splits, *k.shape), device=k.device, dtype=torch.float32)
            dv = torch.empty_like(dk)
        launch(_local_bwd_dkdv_kernel, (R * H, key_tiles, n_splits),
               q, k, v, grad_out, lse, delta, dk, dv, sm_scale, sm_scale * LOG2E, B, *scalars, n_splits,
               PRECISION=precision, **launch_meta(dkdv_cfg))
    if n_splits > 1:
        dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
    return dq, dk, dv
