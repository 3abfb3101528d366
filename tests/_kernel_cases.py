"""Cases, inputs and comparisons shared by the kernel tests (test_kernels, test_triton,
test_extension, test_cuda_emulation): every backend is held to the float64 reference the same way.
"""
from __future__ import annotations

import pytest
import torch

import rlr_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
GRADIENTS = ("out", "dq", "dk", "dv")

# The backend parity grid, (B, H, h, w, d, window, R): non-square grids, window 1 and >= the grid,
# R = 1 and 2, batch 1, odd head dims. Kept small: the Triton kernels run through the interpreter on CPU.
LOCAL_CASES = [
    (2, 2, 4, 4, 16, 3, 1),
    (1, 1, 3, 5, 16, 3, 2),
    (2, 2, 5, 3, 32, 1, 1),
    (1, 2, 4, 4, 16, 7, 1),
    (2, 1, 2, 6, 24, 9, 2),
    (1, 2, 6, 5, 17, 5, 1),
    (3, 2, 8, 8, 64, 5, 1),
]
MASKED_CASES = [
    (2, 2, 4, 4, 16, 1, 1),
    (1, 1, 3, 5, 16, 3, 1),
    (2, 2, 5, 3, 32, 1, 1),
    (1, 2, 6, 5, 17, 3, 1),
    (3, 2, 8, 8, 64, 5, 1),
    (1, 1, 1, 7, 32, 3, 1),
]
# (atol, rtol) against the float64 reference run on the same (rounded) inputs; atol scales with
# the largest reference value.
TOL = {torch.float32: (2e-4, 2e-4), torch.float64: (1e-9, 1e-9), torch.bfloat16: (3e-2, 3e-2),
       torch.float16: (5e-3, 5e-3)}


def op_fn(op: str):
    """The public op named "local" or "masked"."""
    return rlr_kernels.local_reference_attention if op == "local" else rlr_kernels.masked_key_attention


def needs_backend(backend: str, device: str) -> None:
    if backend not in rlr_kernels.available_backends(device):
        pytest.skip(f"backend {backend} is not available on {device}")


def make_inputs(op, B, H, h, w, d, R=1, dtype=torch.float32, device="cpu", seed=0) -> list[torch.Tensor]:
    """[q, k, v, grad_out] of one op, drawn in float32 on the CPU (the same numbers on every
    device and dtype), then cast."""
    g = torch.Generator().manual_seed(seed)
    L = h * w
    q = torch.randn(B, H, L, d, generator=g)
    if op == "local":
        k, v = torch.randn(R, H, L, d, generator=g), torch.randn(R, H, L, d, generator=g)
    else:
        k, v = torch.randn(H, L, d, generator=g), torch.randn(B, H, L, d, generator=g)
    grad = torch.randn(B, H, L, d, generator=g)
    return [t.to(dtype=dtype, device=device) for t in (q, k, v, grad)]


def case_inputs(op, case, dtype=torch.float32, device="cpu", seed=0):
    """[q, k, v, grad_out], grid and window of a (B, H, h, w, d, window, R) case."""
    B, H, h, w, d, window, R = case
    return make_inputs(op, B, H, h, w, d, R, dtype, device, seed), (h, w), window


def fwd_bwd(op, backend, q, k, v, grad, grid, window) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of one forward and backward through the public op."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = op_fn(op)(*leaves, grid=grid, window=window, backend=backend)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves]


def reference_fwd_bwd(op, q, k, v, grad, grid, window) -> list[torch.Tensor]:
    """[out, dq, dk, dv] of the float64 reference on the same inputs: the ground truth."""
    return fwd_bwd(op, "reference", q.double(), k.double(), v.double(), grad.double(), grid, window)


def assert_matches(got, want, dtype, atol, rtol, label) -> None:
    """Each of [out, dq, dk, dv] has the input dtype and the reference's shape, and is within atol
    (scaled by the largest reference value) and rtol of it; `label` names the run in a failure."""
    for name, g_, w_ in zip(GRADIENTS, got, want):
        assert g_.dtype == dtype and g_.shape == w_.shape, name
        scale = max(1.0, w_.abs().max().item())
        torch.testing.assert_close(g_.double().cpu(), w_.cpu(), atol=atol * scale, rtol=rtol,
                                   msg=lambda m: f"{label} {name}: {m}")
