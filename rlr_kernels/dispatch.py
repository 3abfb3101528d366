"""Backend registry, ``torch.library`` custom ops and autograd for both ops.

A fused backend supplies four kernels with one fixed contract (all tensors contiguous):

    local_forward(q, k, v, height, width, window)            -> out (B,H,L,d), lse (B,R,H,L) fp32
    local_backward(q, k, v, out, lse, grad_out, h, w, window) -> dq, dk, dv   (dk, dv batch-summed)
    masked_forward(q, k, v, height, width, window)           -> out (B,H,L,d), lse (B,H,L) fp32
    masked_backward(q, k, v, out, lse, grad_out, h, w, window)-> dq, dk, dv   (dk batch-summed)

``lse`` is the natural-log log-sum-exp of the scaled scores of each query row (per reference copy
for the local op), saved by the forward so the backward recomputes probabilities without storing
them. The kernels are wrapped as ``rlr::*`` custom ops with fake (meta) kernels, so the ops trace
under ``torch.compile``; one ``autograd.Function`` launches them (in eager mode it calls the
kernels directly, skipping the custom-op dispatch). The ``reference`` backend
is plain PyTorch and is differentiated by autograd directly.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from . import reference
from .validate import check_local_args, check_masked_args

BACKENDS = ("reference", "triton", "cpp", "cuda")

# backend=None takes the first available one that takes the inputs' dtype. CPU: fastest first.
# CUDA: Triton before the CUDA kernels until GPU runs vouch for the latter (docs/extension.md):
# Triton's kernel logic is what the CPU test suite exercises, through its interpreter.
PREFERENCE = {
    "cpu": ("cpp", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

_HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class Backend:
    """A fused backend: the module that holds its kernels is imported on first use."""

    name: str
    module: str
    devices: tuple
    dtypes: tuple
    requirement: Callable[[str], Optional[str]] = lambda device: None
    _kernels: object = field(default=None, repr=False)
    _import_error: Optional[str] = field(default=None, repr=False)

    def kernels(self):
        if self._kernels is None and self._import_error is None:
            try:
                self._kernels = importlib.import_module(self.module, __package__)
            except ImportError as err:  # a missing build or package is a reason, not a crash
                self._import_error = str(err)
        return self._kernels

    def unavailable_reason(self, device_type: str) -> Optional[str]:
        if device_type not in self.devices:
            return f"backend {self.name!r} runs on {'/'.join(self.devices)} tensors, not {device_type}"
        reason = self.requirement(device_type)
        if reason:
            return reason
        if self.kernels() is None:
            return f"backend {self.name!r} failed to load: {self._import_error}"
        return None


def _triton_requirement(device_type: str) -> Optional[str]:
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the triton backend runs on CPU tensors only under TRITON_INTERPRET=1 (set before import)"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def _cuda_requirement(device_type: str) -> Optional[str]:
    return None if torch.cuda.is_available() else "CUDA is not available"


_FUSED = {
    "triton": Backend("triton", ".triton", ("cpu", "cuda"), _HALF_AND_FLOAT, _triton_requirement),
    "cpp": Backend("cpp", ".cpp", ("cpu",), _HALF_AND_FLOAT + (torch.float64,)),
    "cuda": Backend("cuda", ".cuda", ("cuda",), _HALF_AND_FLOAT, _cuda_requirement),
}

_warned: set = set()   # (backend, reason) pairs already warned about, to warn once each


def available_backends(device: Optional[str | torch.device] = None) -> list:
    """Names of the backends that can run on ``device`` (default: on any device here)."""
    device_types = [torch.device(device).type] if device is not None else ["cpu"] + (
        ["cuda"] if torch.cuda.is_available() else []
    )
    names = ["reference"]
    for name, backend in _FUSED.items():
        if any(backend.unavailable_reason(dt) is None for dt in device_types):
            names.append(name)
    return names


# Under torch.compile the choice is made once, while tracing (it imports modules and probes the machine):
# the graph holds the chosen backend's custom op.
@torch.compiler.assume_constant_result
def resolve_backend(backend: Optional[str], device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """Check an explicit backend against the device, or pick the fastest for it and ``dtype``.

    An explicit backend is the caller's choice: a dtype it lacks is its kernels' clear error. With
    ``backend=None`` a backend that is missing or lacks the dtype is skipped with a one-time warning.
    """
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend != "reference":
            reason = _FUSED[backend].unavailable_reason(device.type)
            if reason:
                raise ValueError(f"backend {backend!r} cannot run here: {reason}")
        return backend
    for name in PREFERENCE.get(device.type, ("reference",)):
        if name == "reference":
            return name
        fused = _FUSED[name]
        reason = fused.unavailable_reason(device.type)
        if reason is None and dtype is not None and dtype not in fused.dtypes:
            reason = f"it takes {', '.join(str(t).removeprefix('torch.') for t in fused.dtypes)}, not {dtype}"
        if reason is None:
            return name
        if (name, reason) not in _warned:
            _warned.add((name, reason))
            hint = (" Build it with `pip install --no-build-isolation -e .` in the rlr checkout."
                    if name in ("cpp", "cuda") and fused._import_error is not None else "")
            warnings.warn(f"rlr_kernels: fast backend {name!r} unavailable ({reason}); falling back.{hint}",
                          RuntimeWarning, stacklevel=4)
    return "reference"


def _kernels(name: str):
    return _FUSED[name].kernels()


# ---------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, shapes given by the fake kernels.


@torch.library.custom_op("rlr::local_reference_attention_fwd", mutates_args=())
def _local_fwd(q: Tensor, k: Tensor, v: Tensor, height: int, width: int, window: int,
               backend: str) -> tuple[Tensor, Tensor]:
    return _kernels(backend).local_forward(q, k, v, height, width, window)


@_local_fwd.register_fake
def _(q, k, v, height, width, window, backend):
    B, H, L, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, k.shape[0], H, L), dtype=torch.float32)


@torch.library.custom_op("rlr::local_reference_attention_bwd", mutates_args=())
def _local_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
               height: int, width: int, window: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(backend).local_backward(q, k, v, out, lse, grad_out, height, width, window)


@_local_bwd.register_fake
def _(q, k, v, out, lse, grad_out, height, width, window, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("rlr::masked_key_attention_fwd", mutates_args=())
def _masked_fwd(q: Tensor, k: Tensor, v: Tensor, height: int, width: int, window: int,
                backend: str) -> tuple[Tensor, Tensor]:
    return _kernels(backend).masked_forward(q, k, v, height, width, window)


@_masked_fwd.register_fake
def _(q, k, v, height, width, window, backend):
    B, H, L, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("rlr::masked_key_attention_bwd", mutates_args=())
def _masked_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
                height: int, width: int, window: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(backend).masked_backward(q, k, v, out, lse, grad_out, height, width, window)


@_masked_bwd.register_fake
def _(q, k, v, out, lse, grad_out, height, width, window, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# op -> (forward custom op, backward custom op)
_CUSTOM_OPS = {"local": (_local_fwd, _local_bwd), "masked": (_masked_fwd, _masked_bwd)}


def _launchers(op: str, backend: str) -> tuple:
    """(forward, backward) of ``op`` on ``backend``, taking the kernel contract's arguments.

    Under torch.compile they go through the custom ops, the opaque graph nodes. In eager mode they
    are the backend's kernels themselves: the Python custom-op dispatch costs ~0.2 ms per call, a
    tenth of a paper-size local forward+backward on CPU, for no change in the result.
    """
    if torch.compiler.is_compiling():
        forward, backward = _CUSTOM_OPS[op]
        return (lambda *args: forward(*args, backend)), (lambda *args: backward(*args, backend))
    kernels = _kernels(backend)
    return getattr(kernels, f"{op}_forward"), getattr(kernels, f"{op}_backward")


class _FusedAttention(torch.autograd.Function):
    """Launches a backend's forward kernel and, on backward, its backward kernel."""

    @staticmethod
    def forward(ctx, op, q, k, v, height, width, window, backend):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        forward, backward = _launchers(op, backend)
        out, lse = forward(q, k, v, height, width, window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (backward, height, width, window)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        backward, height, width, window = ctx.args
        dq, dk, dv = backward(q, k, v, out, lse, grad_out.contiguous(), height, width, window)
        return None, dq, dk, dv, None, None, None, None


def local_reference_attention(q, k, v, *, grid, window, backend=None):
    """Local reference attention (DESIGN.md §3).

    q (B,H,L,d); k, v (R,H,L,d) shared by the batch; returns (B,H,L,d)::

        out[b,n,i] = sum_c sum_{j in W(i)} softmax_j(q[b,n,i].k[c,n,j] / sqrt(d)) v[c,n,j]

    W(i) is the window x window neighbourhood of token i on the h x w grid, truncated at the
    border. Gradients of k and v are summed over the batch.
    """
    shape = check_local_args(q, k, v, grid, window)
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "reference":
        return reference.local_reference_attention(q, k, v, grid=(shape.height, shape.width), window=window)
    return _FusedAttention.apply("local", q, k, v, shape.height, shape.width, window, name)


def masked_key_attention(q, k, v, *, grid, window, backend=None):
    """Masked learnable-key attention (DESIGN.md §3).

    q (B,H,L,d); k (H,L,d) shared by the batch; v (B,H,L,d); returns (B,H,L,d)::

        out[b,n,i] = sum_{j not in W(i)} softmax_j(q[b,n,i].k[n,j] / sqrt(d)) v[b,n,j]

    A grid/window pair that leaves some query without keys is rejected. The gradient of k is
    summed over the batch.
    """
    shape = check_masked_args(q, k, v, grid, window)
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "reference":
        return reference.masked_key_attention(q, k, v, grid=(shape.height, shape.width), window=window)
    return _FusedAttention.apply("masked", q, k, v, shape.height, shape.width, window, name)
