"""Kernel-level suite: both RLR attention ops, forward and forward+backward, every method side by side.

Methods (the ``backend`` column):

    original       the original RLR code's formulation: nn.MultiheadAttention's math path
                   (q*scale, baddbmm with a dense float (L, L) mask of 0/-inf, softmax, bmm, and the
                   head-averaged weights MHA returns by default), the reference k/v ``.repeat``ed for
                   every sample of the batch.
    sdpa           F.scaled_dot_product_attention with a boolean (L, L) mask, reference k/v expanded
                   (not copied) over the batch.
    flex           FlexAttention eager (torch.nn.attention.flex_attention, block mask from a mask_mod).
    flex-compiled  torch.compile(flex_attention): fused; on CPU PyTorch compiles the forward only.
    natten         NATTEN's na2d (local op only). Its border windows are *shifted* inwards (always
                   k x k keys), RLR's are *truncated*: it computes a slightly different op (see
                   max_abs_err), timed here as the closest library op.
    rlr-<name>     our rlr_kernels backends, every one available on the device at run time.
    rlr-cpp-noamx  the cpp backend with its AMX path turned off (RLR_CPU_AMX=0): bfloat16 computed in
                   float32 vector code. Listed on CPUs where the AMX path exists, so the two compare
                   side by side.
    rlr-cpp-kernel / rlr-cpp-flash
                   the cpp backend's masked op on the path this CPU does not take by default
                   (RLR_CPU_MASKED): its C++ kernel where the default is ATen's CPU flash attention (no
                   AVX-512), ATen's flash attention where the default is the kernel. Masked op only.

Inputs are per-head tensors as rlr_kernels takes them (DESIGN.md §3): local q (B,H,L,d), k/v
(R,H,L,d); masked q (B,H,L,d), k (H,L,d), v (B,H,L,d). ``fwd`` rows run under ``torch.no_grad``;
``fwd+bwd`` rows run the forward with autograd and ``torch.autograd.grad`` of all inputs.

Useful FLOPs (``gflop``): local forward 4*B*H*d*R*sum_i |W(i)| (QK^T and PV over each query's
truncated window), masked forward 4*B*H*d*sum_i (L - |W(i)|); forward+backward counts 3x the
forward (the backward's dV, dP, dQ, dK products; recomputation and softmax are not counted).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import rlr_kernels
from rlr_kernels import dispatch, reference
from rlr_kernels.window import in_window, reach, window_mask, window_sizes

from .common import Row, Skip, TimingPolicy, error_text, peak_memory_mb, round_row, summarise, time_calls

OPS = ("local", "masked")
MODES = ("fwd", "fwd+bwd")

# (grid side, head dim, window): the paper's two levels (D=256 and D=512 with 8 heads), and 64x64.
PAPER_GRIDS = ((32, 32, 7), (16, 64, 5))
SCALING_GRID = (64, 32, 11)
BATCHES = (4, 16)
HEADS = 8


@dataclass(frozen=True)
class KernelShape:
    batch: int
    heads: int
    height: int
    width: int
    head_dim: int
    window: int
    copies: int = 1

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def label(self) -> str:
        copies = f" R{self.copies}" if self.copies != 1 else ""
        return f"B{self.batch} H{self.heads} {self.height}x{self.width} d{self.head_dim} w{self.window}{copies}"

    def score_bytes(self, itemsize: int = 4) -> int:
        """Bytes of one dense (B*H*R, L, L) score tensor: what dense methods materialise."""
        return self.batch * self.heads * self.copies * self.tokens ** 2 * itemsize


def kernel_shapes(quick: bool, device: torch.device) -> list:
    """The configurations of the suite: paper shapes at batch 4 and 16, and 64x64 for scaling.

    A quick run on a CPU times the 64x64 grid at batch 4 only.
    """
    shapes = [KernelShape(b, HEADS, side, side, d, k) for side, d, k in PAPER_GRIDS for b in BATCHES]
    side, d, k = SCALING_GRID
    scaling_batches = (4,) if (quick and device.type == "cpu") else BATCHES
    shapes += [KernelShape(b, HEADS, side, side, d, k) for b in scaling_batches]
    return sorted(shapes, key=lambda s: (s.tokens, s.batch))


def useful_gflop(op: str, mode: str, shape: KernelShape) -> float:
    inside = int(window_sizes(shape.height, shape.width, shape.window).sum())
    keys = shape.copies * inside if op == "local" else shape.tokens * shape.tokens - inside
    forward = 4.0 * shape.batch * shape.heads * shape.head_dim * keys
    return (forward if mode == "fwd" else 3.0 * forward) / 1e9


# ------------------------------------------------------------------------------------ inputs


def make_inputs(op: str, shape: KernelShape, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, H, L, d, R = shape.batch, shape.heads, shape.tokens, shape.head_dim, shape.copies

    def randn(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    q = randn(B, H, L, d)
    if op == "local":
        k, v = randn(R, H, L, d), randn(R, H, L, d)
    else:
        k, v = randn(H, L, d), randn(B, H, L, d)
    return {"q": q, "k": k, "v": v, "grad": randn(B, H, L, d)}


@dataclass
class Prepared:
    """A method ready to run: ``forward()`` returns (B,H,L,d); ``leaves`` get gradients;
    ``environment`` holds variables set around every timed call (forward and backward)."""

    forward: Callable[[], torch.Tensor]
    leaves: list
    note: str = ""
    environment: dict = field(default_factory=dict)


def _leaves(inputs: dict, grad: bool) -> tuple:
    return tuple(inputs[n].detach().clone().requires_grad_(grad) for n in ("q", "k", "v"))


# ------------------------------------------------------------------------------------ methods


def _mha_math(q, k, v, mask, batch, heads):
    """F.multi_head_attention_forward's math path (need_weights=True, nn.MultiheadAttention's
    default) after the in-projection: q, k, v (B*H, L, d); mask float (L, L)."""
    q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
    weights = torch.baddbmm(mask, q_scaled, k.transpose(-2, -1))
    weights = torch.softmax(weights, dim=-1)
    out = torch.bmm(weights, v)
    averaged = weights.view(batch, heads, q.shape[1], k.shape[1]).mean(dim=1)   # returned by MHA, unused
    return out, averaged


def _float_mask(shape: KernelShape, attend_inside: bool, device, dtype) -> torch.Tensor:
    inside = window_mask(shape.height, shape.width, shape.window, device)
    allowed = inside if attend_inside else ~inside
    mask = torch.zeros(shape.tokens, shape.tokens, device=device, dtype=dtype)
    return mask.masked_fill(~allowed, float("-inf"))


def build_original(op, shape, inputs, grad, device):
    q, k, v = _leaves(inputs, grad)
    B, H, L, d = q.shape
    mask = _float_mask(shape, op == "local", device, q.dtype)

    if op == "local":
        def forward():
            out = None
            for c in range(k.shape[0]):   # one MHA call per reference copy, outputs summed
                k_c = k[c].unsqueeze(0).repeat(B, 1, 1, 1).reshape(B * H, L, d)   # reference repeated per sample
                v_c = v[c].unsqueeze(0).repeat(B, 1, 1, 1).reshape(B * H, L, d)
                o, _ = _mha_math(q.reshape(B * H, L, d), k_c, v_c, mask, B, H)
                out = o if out is None else out + o
            return out.view(B, H, L, d)
    else:
        def forward():
            k_rep = k.unsqueeze(0).repeat(B, 1, 1, 1).reshape(B * H, L, d)
            o, _ = _mha_math(q.reshape(B * H, L, d), k_rep, v.reshape(B * H, L, d), mask, B, H)
            return o.view(B, H, L, d)
    return Prepared(forward, [q, k, v])


def build_sdpa(op, shape, inputs, grad, device):
    q, k, v = _leaves(inputs, grad)
    B = q.shape[0]
    inside = window_mask(shape.height, shape.width, shape.window, device)
    if op == "local":
        def forward():
            out = None
            for c in range(k.shape[0]):
                o = F.scaled_dot_product_attention(q, k[c].expand(B, -1, -1, -1), v[c].expand(B, -1, -1, -1),
                                                   attn_mask=inside)
                out = o if out is None else out + o
            return out
    else:
        outside = ~inside

        def forward():
            return F.scaled_dot_product_attention(q, k.expand(B, -1, -1, -1), v, attn_mask=outside)
    return Prepared(forward, [q, k, v])


def _flex_mask_mod(shape: KernelShape, op: str):
    width, half = shape.width, reach(shape.window)

    def inside(b, h, q_idx, kv_idx):
        return in_window(q_idx // width, q_idx % width, kv_idx // width, kv_idx % width, half)

    def outside(b, h, q_idx, kv_idx):
        return ~inside(b, h, q_idx, kv_idx)

    return inside if op == "local" else outside


_compiled_flex = None


def _build_flex(op, shape, inputs, grad, device, compiled: bool):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as err:
        raise Skip(f"unavailable: {err}") from None
    global _compiled_flex
    attend = flex_attention
    if compiled and grad and device.type == "cpu":
        # Checked here, not left to fail: a failed compile makes dynamo skip flex_attention for good,
        # and every later compiled row of the run would silently time the eager path.
        raise Skip("PyTorch compiles FlexAttention on CPU for inference only (no CPU backward)")
    if compiled:
        if _compiled_flex is None:
            import torch._dynamo
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 128)
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        attend = _compiled_flex
    q, k, v = _leaves(inputs, grad)
    B, L = q.shape[0], shape.tokens
    block_mask = create_block_mask(_flex_mask_mod(shape, op), None, None, L, L, device=device)
    if op == "local":
        def forward():
            out = None
            for c in range(k.shape[0]):
                o = attend(q, k[c].expand(B, -1, -1, -1), v[c].expand(B, -1, -1, -1), block_mask=block_mask)
                out = o if out is None else out + o
            return out
    else:
        def forward():
            return attend(q, k.expand(B, -1, -1, -1), v, block_mask=block_mask)
    note = "block mask built once, outside the timing"
    if compiled:
        note += "; first call (compile) time in extra.first_call_s"
    return Prepared(forward, [q, k, v], note)


def build_flex(op, shape, inputs, grad, device):
    return _build_flex(op, shape, inputs, grad, device, compiled=False)


def build_flex_compiled(op, shape, inputs, grad, device):
    return _build_flex(op, shape, inputs, grad, device, compiled=True)


_natten_status: Optional[str] = None


def natten_status() -> str:
    """"available (<version>, libnatten: yes/no)" or "unavailable: <reason>"."""
    global _natten_status
    if _natten_status is None:
        try:
            import natten
            _natten_status = (f"available ({getattr(natten, '__version__', '?')}, "
                              f"libnatten: {'yes' if getattr(natten, 'HAS_LIBNATTEN', False) else 'no'})")
        except Exception as err:  # ImportError, or a binary that does not load on this machine
            _natten_status = f"unavailable: {error_text(err)}"
    return _natten_status


NATTEN_NOTE = "NATTEN shifts border windows inwards (RLR truncates them): a slightly different op"


def build_natten(op, shape, inputs, grad, device):
    if op != "local":
        raise Skip("NATTEN has no attention to the complement of a window")
    status = natten_status()
    if not status.startswith("available"):
        raise Skip(status)
    import natten

    B, H, L, d = inputs["q"].shape
    h, w = shape.height, shape.width

    def native(t):   # (N, H, L, d) -> (N, h, w, H, d): NATTEN's layout, prepared outside the timing
        return t.detach().permute(0, 2, 1, 3).reshape(t.shape[0], h, w, H, d).contiguous().requires_grad_(grad)

    q, k, v = native(inputs["q"]), native(inputs["k"]), native(inputs["v"])

    def forward():
        out = None
        for c in range(k.shape[0]):
            o = natten.na2d(q, k[c:c + 1].expand(B, -1, -1, -1, -1), v[c:c + 1].expand(B, -1, -1, -1, -1),
                            kernel_size=shape.window)
            out = o if out is None else out + o
        return out.permute(0, 3, 1, 2, 4).flatten(2, 3)   # a view in (B, H, L, d)
    return Prepared(forward, [q, k, v], f"{NATTEN_NOTE}; {status}")


def _build_rlr(backend, environment=None):
    def build(op, shape, inputs, grad, device):
        q, k, v = _leaves(inputs, grad)
        fn = rlr_kernels.local_reference_attention if op == "local" else rlr_kernels.masked_key_attention
        grid = (shape.height, shape.width)

        def forward():
            return fn(q, k, v, grid=grid, window=shape.window, backend=backend)
        return Prepared(forward, [q, k, v], environment=dict(environment or {}))
    return build


def _build_rlr_cpp_noamx(op, shape, inputs, grad, device):
    if inputs["q"].dtype != torch.bfloat16:
        raise Skip("the AMX path is bfloat16 only: in this dtype it runs what rlr-cpp runs")
    return _build_rlr("cpp", {"RLR_CPU_AMX": "0"})(op, shape, inputs, grad, device)


def _build_rlr_cpp_other_masked_path(path):
    def build(op, shape, inputs, grad, device):
        if op != "masked":
            raise Skip("the local op has one path")
        return _build_rlr("cpp", {"RLR_CPU_MASKED": path})(op, shape, inputs, grad, device)
    return build


def _cpu_masked_path() -> Optional[str]:
    try:
        from rlr_kernels import cpp
    except ImportError:
        return None
    return cpp.masked_float32_path()


def _cpu_amx_available() -> bool:
    try:
        from rlr_kernels import cpp
    except ImportError:
        return False
    return cpp.masked_amx_available()


# Methods that materialise dense (B*H*R, L, L) scores: capped on memory (``dense_cap_bytes``).
DENSE_METHODS = {"original", "flex", "natten", "rlr-reference"}


def methods(device: torch.device) -> dict:
    """name -> builder, in table order: baselines first, then our backends available here."""
    table = {
        "original": build_original,
        "sdpa": build_sdpa,
        "flex": build_flex,
        "flex-compiled": build_flex_compiled,
        "natten": build_natten,
    }
    for name in rlr_kernels.available_backends(device):
        table[f"rlr-{name}"] = _build_rlr(name)
    if device.type == "cpu" and "rlr-cpp" in table and _cpu_amx_available():
        table["rlr-cpp-noamx"] = _build_rlr_cpp_noamx
    if device.type == "cpu" and "rlr-cpp" in table:
        other = {"flash": "kernel", "kernel": "flash"}[_cpu_masked_path()]
        table[f"rlr-cpp-{other}"] = _build_rlr_cpp_other_masked_path(other)
    return table


def backend_report(device: torch.device) -> dict:
    """Every rlr_kernels backend: "available" or the reason it is not, on this device."""
    report = {}
    available = set(rlr_kernels.available_backends(device))
    for name in rlr_kernels.BACKENDS:
        if name in available:
            report[name] = "available"
            continue
        try:
            dispatch.resolve_backend(name, device)
            report[name] = "available"
        except ValueError as err:
            report[name] = f"unavailable: {err}"
    report["natten"] = natten_status()
    return report


def _dense_skip_reason(method: str, shape: KernelShape, device: torch.device, dense_cap_bytes: int,
                       dtype: torch.dtype, quick: bool = False) -> Optional[str]:
    if method not in DENSE_METHODS:
        return None
    if quick and device.type == "cpu" and method != "original" and (shape.batch > min(BATCHES) or shape.tokens > 1024):
        return (f"quick CPU run: dense fallbacks other than the original are timed at batch {min(BATCHES)} up to "
                f"32x32 only (they cost as much as the original or more)")
    # flex/natten are dense only when eager; on CUDA natten may run fused libnatten kernels.
    if method == "natten" and device.type == "cuda" and "libnatten: yes" in natten_status():
        return None
    size = shape.score_bytes(torch.finfo(dtype).bits // 8)
    if size > dense_cap_bytes:
        return (f"dense (B*H*L*L) scores of {size / 2 ** 30:.1f} GiB exceed the cap of "
                f"{dense_cap_bytes / 2 ** 30:.1f} GiB for dense methods on {device.type} (--dense-cap-gb)")
    return None


# ------------------------------------------------------------------------------------ the suite


class _ReferenceCache:
    """Forward output of the dense rlr reference per (op, shape, dtype), for max_abs_err."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, op, shape, inputs, dtype, allowed: bool):
        key = (op, shape, dtype)
        if self.key != key:
            self.key, self.value = key, None
            if allowed:
                fn = reference.local_reference_attention if op == "local" else reference.masked_key_attention
                with torch.no_grad():
                    self.value = fn(inputs["q"], inputs["k"], inputs["v"], grid=(shape.height, shape.width),
                                    window=shape.window).float()
        return self.value


@contextlib.contextmanager
def _environment(variables: dict):
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_call(prepared: Prepared, mode: str, inputs: dict) -> Callable[[], object]:
    """The timed call: the forward under no_grad, or forward + gradients of all inputs."""
    if mode == "fwd":
        def call():
            with _environment(prepared.environment), torch.no_grad():
                return prepared.forward()
        return call
    grad = inputs["grad"]

    def call():
        with _environment(prepared.environment):
            out = prepared.forward()
            return torch.autograd.grad(out, prepared.leaves, grad)
    return call


def run_row(method: str, builder, op: str, mode: str, shape: KernelShape, inputs: dict, device: torch.device,
            dtype: torch.dtype, policy: TimingPolicy, dense_cap_bytes: int, expected=None,
            measure_memory: bool = True, quick: bool = False) -> Row:
    row = Row(bench="kernels", op=op, mode=mode, shape=shape.label, backend=method, device=device.type,
              dtype=str(dtype).replace("torch.", ""), batch=shape.batch, tokens=shape.tokens,
              gflop=useful_gflop(op, mode, shape))
    reason = _dense_skip_reason(method, shape, device, dense_cap_bytes, dtype, quick)
    if reason:
        row.status, row.note = "skipped", reason
        return row
    prepared = None
    try:
        prepared = builder(op, shape, inputs, mode == "fwd+bwd", device)
        call = make_call(prepared, mode, inputs)
        times, first = time_calls(call, device, policy)
        row.__dict__.update(summarise(times))
        if first is not None:
            row.extra["first_call_s"] = round(first, 4)
        if measure_memory:
            result = {}

            def remember():
                result["out"] = call()

            row.peak_mem_mb = peak_memory_mb(remember, device)
            if mode == "fwd" and expected is not None:
                row.max_abs_err = float((result["out"].float() - expected).abs().max())
            result.clear()
        row.note = prepared.note
    except Skip as skip:
        row.status, row.note = "skipped", str(skip)
    except NotImplementedError as err:
        if method.startswith("rlr-"):
            row.status, row.note = "error", error_text(err)
        else:   # a library's documented limit (e.g. no FlexAttention backward on CPU), not a failure
            row.status, row.note = "skipped", f"unsupported by the installed library: {error_text(err)}"
    except Exception as err:  # a failing method is a recorded result, not the end of the suite
        row.status, row.note = "error", error_text(err)
        if prepared is not None and prepared.note:
            row.note += f" ({prepared.note})"
    finally:
        prepared = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    round_row(row)
    return row


def run_kernels(device: torch.device, dtypes, quick: bool, policy: TimingPolicy, dense_cap_bytes: int,
                log=print, only_methods=None, exclude_methods=()) -> list:
    rows = []
    table = methods(device)
    unknown = (set(only_methods or ()) | set(exclude_methods)) - set(table)
    if unknown:
        raise ValueError(f"unknown kernel methods {sorted(unknown)}; available here: {sorted(table)}")
    table = {k: v for k, v in table.items() if (not only_methods or k in only_methods) and k not in exclude_methods}
    refs = _ReferenceCache()
    for dtype in dtypes:
        for shape in kernel_shapes(quick, device):
            for op in OPS:
                inputs = make_inputs(op, shape, device, dtype)
                ref_allowed = _dense_skip_reason("rlr-reference", shape, device, dense_cap_bytes, dtype, quick) is None
                expected = refs.get(op, shape, inputs, dtype, ref_allowed)
                for mode in MODES:
                    for method, builder in table.items():
                        row = run_row(method, builder, op, mode, shape, inputs, device, dtype, policy,
                                      dense_cap_bytes, expected, quick=quick)
                        rows.append(row)
                        log(_describe(row))
                inputs = None
    return rows


def _describe(row: Row) -> str:
    head = f"[kernels] {row.dtype} {row.op:6s} {row.mode:7s} {row.shape:24s} {row.backend:16s}"
    if row.status != "ok":
        return f"{head} {row.status}: {row.note}"
    mem = f"{row.peak_mem_mb:9.1f} MiB" if row.peak_mem_mb is not None else ""
    return f"{head} {row.median_ms:10.3f} ms  (n={row.repeats}) {mem}"
