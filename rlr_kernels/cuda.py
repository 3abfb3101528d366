"""The ``cuda`` backend: CUDA kernels of both ops (compiled module ``rlr_kernels._C_cuda``).

float32, float16 and bfloat16 inputs, float32 accumulation (float64 raises NotImplementedError:
use ``backend="reference"``). Kernel contract (contiguous CUDA inputs) as in
:mod:`rlr_kernels.dispatch`::

    local_forward(q (B,H,L,d), k (R,H,L,d), v (R,H,L,d), h, w, window) -> out, lse (B,R,H,L) fp32
    local_backward(q, k, v, out, lse, grad_out, h, w, window)          -> dq, dk, dv (dk, dv batch-summed)
    masked_forward(q (B,H,L,d), k (H,L,d), v (B,H,L,d), h, w, window) -> out, lse (B,H,L) fp32
    masked_backward(q, k, v, out, lse, grad_out, h, w, window)        -> dq, dk, dv (dk batch-summed)

One thread per query (forward, dq) or per key (dk, dv), with the keys / queries a block shares
staged in shared memory; batch sums run in a fixed order, so results are deterministic.
See docs/extension.md.
"""
try:
    from . import _C_cuda
except ImportError as err:  # dispatch.py turns this into a one-time warning and a fallback
    raise ImportError(
        "rlr_kernels._C_cuda (the CUDA kernels of the 'cuda' backend) is not built or failed to load "
        f"({err}). Build it from the rlr checkout with `CUDA_HOME=/path/to/cuda pip install "
        "--no-build-isolation -e .` on a machine with nvcc and a CUDA build of torch "
        "(RLR_BUILD_CUDA=1 forces it)."
    ) from err

local_forward = _C_cuda.local_forward
local_backward = _C_cuda.local_backward
masked_forward = _C_cuda.masked_forward
masked_backward = _C_cuda.masked_backward

__all__ = ["local_forward", "local_backward", "masked_forward", "masked_backward"]
