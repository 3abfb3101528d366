"""Ahead-of-time builds of the Triton kernels for a GPU that is not here.

Triton compiles for any NVIDIA target without a device: PTX, then a cubin through the ``ptxas``
its wheel ships. What is compiled here is exactly what the launchers would launch on that GPU:
the launchers run on ``meta`` tensors inside ``utils.capture(target)``, so they pick their tiles,
warps, stages and batch splits for ``target`` with the code they use on a real GPU, and record
their launches instead of running them; each launch is then specialised as Triton's JIT would
specialise it (pointer alignment, integers equal to 1 or divisible by 16, constexprs) and
compiled. ``tools/kernel_resources.py`` inspects the cubins (registers, spills, shared memory,
tensor-core instructions) and ``tests/test_gpu_builds.py`` holds them to the limits.

    from rlr_kernels.triton import aot
    for launch in aot.launches("masked", aot.Problem(head_dim=64), torch.bfloat16, utils.H100):
        kernel = aot.compile_launch(launch, utils.H100)   # triton CompiledKernel: .asm["cubin"], .metadata

Triton must not be in interpreter mode (``TRITON_INTERPRET=1``) when this module compiles:
the interpreter replaces ``triton.jit`` kernels with Python stand-ins.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import local_reference_attention as local_mod
from . import masked_key_attention as masked_mod
from .utils import GpuTarget, Launch, capture


@dataclass(frozen=True)
class Problem:
    """A call of one op, the shape the launches are configured for. The default is the paper's
    32x32 level (batch 4, 8 heads, window 7) with one reference copy (the model's default; with
    ``copies`` > 1 the local op's backward launches its delta kernel instead of ``row_dot``)."""

    head_dim: int = 32
    batch: int = 4
    heads: int = 8
    height: int = 32
    width: int = 32
    window: int = 7
    copies: int = 1


def _inputs(op: str, problem: Problem, dtype: torch.dtype) -> tuple:
    B, H, L, d, R = problem.batch, problem.heads, problem.height * problem.width, problem.head_dim, problem.copies

    def empty(*shape):
        return torch.empty(shape, device="meta", dtype=dtype)

    if op == "local":
        return empty(B, H, L, d), empty(R, H, L, d), empty(R, H, L, d)
    if op == "masked":
        return empty(B, H, L, d), empty(H, L, d), empty(B, H, L, d)
    raise ValueError(f"op must be 'local' or 'masked', got {op!r}")


def pass_launches(op: str, problem: Problem, dtype: torch.dtype, target: GpuTarget) -> tuple:
    """(forward launches, backward launches) of ``op`` for ``problem`` on ``target``, in order."""
    q, k, v = _inputs(op, problem, dtype)
    forward, backward = ((local_mod.local_forward, local_mod.local_backward) if op == "local"
                         else (masked_mod.masked_forward, masked_mod.masked_backward))
    grid = (problem.height, problem.width, problem.window)
    with capture(target) as forward_launches:
        out, lse = forward(q, k, v, *grid)
    with capture(target) as backward_launches:
        backward(q, k, v, out, lse, torch.empty_like(out), *grid)
    return forward_launches, backward_launches


def launches(op: str, problem: Problem, dtype: torch.dtype, target: GpuTarget) -> list:
    """The launches of ``op``'s forward and backward for ``problem`` on ``target``, in order."""
    forward, backward = pass_launches(op, problem, dtype, target)
    return forward + backward


def triton_target(target: GpuTarget) -> GPUTarget:
    return GPUTarget("cuda", target.capability, 32)


def compile_launch(launch: Launch, target: GpuTarget):
    """Compile one recorded launch for ``target`` as ``kernel[grid](*args, **meta)`` would on that
    GPU (the steps of ``JITFunction.run`` before its launch, with the target named instead of
    asked from a driver). Returns Triton's ``CompiledKernel``; raises on a compile error."""
    fn, gpu = launch.kernel, triton_target(target)
    backend = make_backend(gpu)
    kwargs = dict(launch.meta)
    kwargs.setdefault("debug", bool(getattr(fn, "debug", False)) or bool(_knob("runtime", "debug")))
    mode = _knob("compilation", "instrumentation_mode")
    if mode is not None:
        kwargs["instrumentation_mode"] = mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)


def _knob(group: str, name: str):
    """``triton.knobs.<group>.<name>``, or None where this triton version lacks it."""
    knobs = getattr(triton, "knobs", None)
    return getattr(getattr(knobs, group, None), name, None)
