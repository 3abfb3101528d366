"""rlr_kernels: the two attention ops at the core of RLR as fused kernels (DESIGN.md §3).

    local_reference_attention(q, k, v, *, grid, window, backend=None)
    masked_key_attention(q, k, v, *, grid, window, backend=None)
    available_backends(device=None)

Backends: "reference" (dense PyTorch ground truth), "triton", "cpp" (C++ extension, CPU) and
"cuda" (C++ extension, GPU). ``backend=None`` picks the fastest available for the device.
"""
from .dispatch import BACKENDS, available_backends, local_reference_attention, masked_key_attention

__all__ = ["BACKENDS", "available_backends", "local_reference_attention", "masked_key_attention"]
