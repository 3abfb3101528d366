"""The ``cpp`` backend: C++ CPU kernels of both ops (compiled module ``rlr_kernels._C``).

Multi-threaded with ``at::parallel_for`` (``torch.set_num_threads`` applies), vectorised with one
code path per x86-64 ISA level chosen at load time, and bitwise independent of the thread count.
On CPUs without AVX-512 the masked op (float32, and float16/bfloat16 without AMX) runs on ATen's
CPU flash attention instead, with the window as an additive mask (``masked_float32_path()`` says
"flash"; ``RLR_CPU_MASKED=kernel|flash`` forces a path): the kernel's 16-lane vectors do not fit
such a CPU's registers (docs/extension.md).
float32 and float64 compute in their own precision; float16/bfloat16 are computed in float32,
except that bfloat16 masked attention with L and d multiples of 16 runs its products on AMX
tiles (bf16 x bf16 -> fp32, softmax in fp32) on CPUs that have them (``masked_amx_available()``;
``RLR_CPU_AMX=0`` in the environment turns that off).
Kernel contract (contiguous inputs) as in :mod:`rlr_kernels.dispatch`::

    local_forward(q (B,H,L,d), k (R,H,L,d), v (R,H,L,d), h, w, window) -> out, lse (B,R,H,L) fp32
    local_backward(q, k, v, out, lse, grad_out, h, w, window)          -> dq, dk, dv (dk, dv batch-summed)
    masked_forward(q (B,H,L,d), k (H,L,d), v (B,H,L,d), h, w, window) -> out, lse (B,H,L) fp32
    masked_backward(q, k, v, out, lse, grad_out, h, w, window)        -> dq, dk, dv (dk batch-summed)

The local op costs O(B·R·H·L·window²·d); the masked op streams blocks of query rows against the
head's shared keys and masks each row's window by index (no L x L mask). Both backward kernels
recompute the scores and re-derive the softmax statistics from them (``out`` and ``lse`` are
checked against the contract but not needed), except the AMX path, which reads them as flash
attention does. See docs/extension.md.
"""
try:
    from . import _C
except ImportError as err:  # dispatch.py turns this into a one-time warning and a fallback
    raise ImportError(
        "rlr_kernels._C (the C++ CPU kernels of the 'cpp' backend) is not built or failed to load "
        f"({err}). Build it from the rlr checkout with `pip install --no-build-isolation -e .` "
        "(torch must be installed first; RLR_BUILD_CUDA=0 skips the CUDA part)."
    ) from err

local_forward = _C.local_forward
local_backward = _C.local_backward
masked_forward = _C.masked_forward
masked_backward = _C.masked_backward
masked_amx_available = _C.masked_amx_available
masked_float32_path = _C.masked_float32_path
masked_flash_mask_cache = _C.masked_flash_mask_cache
masked_flash_mask_cache_clear = _C.masked_flash_mask_cache_clear

__all__ = ["local_forward", "local_backward", "masked_forward", "masked_backward", "masked_amx_available",
           "masked_float32_path", "masked_flash_mask_cache", "masked_flash_mask_cache_clear"]
