"""Dense PyTorch ground truth of both ops: builds the full L x L window mask, as the original
RLR code does, and lets autograd differentiate it. Every other backend is tested against it.

Computation runs in float32 (float64 for float64 inputs) and the result is cast back to the
input dtype, so that half-precision inputs get an fp32-accumulated ground truth.
"""
from __future__ import annotations

import math

import torch

from .window import window_mask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def local_reference_attention(q, k, v, *, grid, window):
    """out[b,n,i] = sum_c sum_{j in W(i)} softmax_j(q[b,n,i].k[c,n,j] / sqrt(d)) v[c,n,j].

    q (B,H,L,d); k, v (R,H,L,d) shared by the batch; returns (B,H,L,d).
    """
    ct = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    scale = 1.0 / math.sqrt(q.shape[-1])
    inside = window_mask(grid[0], grid[1], window, q.device)
    scores = torch.einsum("bnid,cnjd->bcnij", qc, kc) * scale
    scores = scores.masked_fill(~inside, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bcnij,cnjd->bnid", probs, vc)
    return out.to(q.dtype)


def masked_key_attention(q, k, v, *, grid, window):
    """out[b,n,i] = sum_{j not in W(i)} softmax_j(q[b,n,i].k[n,j] / sqrt(d)) v[b,n,j].

    q (B,H,L,d); k (H,L,d) shared by the batch; v (B,H,L,d); returns (B,H,L,d).
    """
    ct = _compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    scale = 1.0 / math.sqrt(q.shape[-1])
    inside = window_mask(grid[0], grid[1], window, q.device)
    scores = torch.einsum("bnid,njd->bnij", qc, kc) * scale
    scores = scores.masked_fill(inside, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bnij,bnjd->bnid", probs, vc)
    return out.to(q.dtype)
