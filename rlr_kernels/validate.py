"""Argument checks shared by every backend of both ops (DESIGN.md §3).

Every check raises before any kernel runs, and names the argument at fault, so that a bad
call never reaches a kernel (where it would crash or, worse, read out of bounds).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .window import check_grid_window, check_masked_window

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttentionShape:
    """Sizes of one call: batch B, heads H, tokens L = h*w, head dim d, reference copies R."""

    batch: int
    heads: int
    tokens: int
    head_dim: int
    copies: int
    height: int
    width: int
    window: int


def _check_tensor(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _check_same(q: torch.Tensor, others: dict) -> None:
    for name, t in others.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all inputs must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must be on one device")


def check_local_args(q, k, v, grid, window) -> AttentionShape:
    """Checks for ``local_reference_attention``: q (B,H,L,d), k and v (R,H,L,d)."""
    _check_tensor("q", q, 4, "(B, H, L, d)")
    _check_tensor("k", k, 4, "(R, H, L, d)")
    _check_tensor("v", v, 4, "(R, H, L, d)")
    _check_same(q, {"k": k, "v": v})
    B, H, L, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (R, H, L, d), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    R = k.shape[0]
    if tuple(k.shape[1:]) != (H, L, d):
        raise ValueError(f"k must have shape (R, {H}, {L}, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if B < 1 or R < 1 or H < 1 or d < 1 or L < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}")
    h, w, window = check_grid_window(grid, window, L)
    return AttentionShape(B, H, L, d, R, h, w, window)


def check_masked_args(q, k, v, grid, window) -> AttentionShape:
    """Checks for ``masked_key_attention``: q (B,H,L,d), k (H,L,d), v (B,H,L,d)."""
    _check_tensor("q", q, 4, "(B, H, L, d)")
    _check_tensor("k", k, 3, "(H, L, d)")
    _check_tensor("v", v, 4, "(B, H, L, d)")
    _check_same(q, {"k": k, "v": v})
    B, H, L, d = q.shape
    if tuple(k.shape) != (H, L, d):
        raise ValueError(f"k must have shape (H, L, d) = ({H}, {L}, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape) != (B, H, L, d):
        raise ValueError(f"v must have the shape of q {tuple(q.shape)}, got {tuple(v.shape)}")
    if B < 1 or H < 1 or d < 1 or L < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}")
    h, w, window = check_grid_window(grid, window, L)
    check_masked_window(h, w, window)
    return AttentionShape(B, H, L, d, 1, h, w, window)
