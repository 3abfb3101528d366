"""Triton backend of rlr_kernels: fused forward and backward kernels of both ops.

Implements the dispatcher's four-kernel contract (see ``rlr_kernels/dispatch.py``). On CPU
tensors it runs only through Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before this package, or triton itself, is first imported.
"""
from .local_reference_attention import local_backward, local_forward
from .masked_key_attention import masked_backward, masked_forward

__all__ = ["local_forward", "local_backward", "masked_forward", "masked_backward"]
