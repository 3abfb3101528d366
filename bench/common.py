"""What every suite of the bench shares: the result row, timing, peak memory, the machine, and
the GEMM throughput every achieved GFLOP/s is compared with.

Timing: one warm-up call, then repeated calls until both ``min_repeats`` calls and the row's time
budget are spent (at most ``max_repeats``; a first timed call slower than ``slow_call_s`` is the
only one); each call is timed alone (``torch.cuda.synchronize``
before and CUDA events around it on a GPU, ``time.perf_counter`` on a CPU). A row reports the
median, the quartiles and min/max of those calls.

Peak memory (``peak_mem_mb``): the most bytes held by torch tensors *on top of* what was held when
the call started (inputs, parameters and optimiser state are excluded, so rows compare the working
memory each method needs). CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, minus ``memory_allocated`` before. CPU: one extra call under
``torch.profiler`` with ``profile_memory=True``; the allocator reports every allocation and free of
a CPU tensor made in the calling thread, and the running sum of those sizes, in time order, peaks
at the working memory (exact tensor bytes, unlike RSS, which malloc's caching blurs).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Row:
    """One measured (or skipped, or failed) configuration of one method."""

    bench: str                       # "kernels" | "end_to_end"
    op: str                          # "local" | "masked" | "train_step" | "inference" | "epoch" ...
    mode: str                        # "fwd" | "fwd+bwd" | "train" | "infer"
    shape: str                       # human-readable shape, e.g. "B4 H8 32x32 d32 w7"
    backend: str                     # the method measured, e.g. "original", "sdpa", "rlr-cpp"
    device: str
    dtype: str = "float32"
    batch: Optional[int] = None
    tokens: Optional[int] = None     # L of the (largest) token grid
    median_ms: Optional[float] = None
    q1_ms: Optional[float] = None
    q3_ms: Optional[float] = None
    min_ms: Optional[float] = None
    max_ms: Optional[float] = None
    repeats: int = 0
    speedup_vs_original: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    gflop: Optional[float] = None    # useful FLOPs of one call, in GFLOP (see docs/bench.md)
    gflops: Optional[float] = None   # achieved GFLOP/s at the median
    pct_of_gemm: Optional[float] = None
    throughput: Optional[float] = None        # images/s for end-to-end rows
    max_abs_err: Optional[float] = None       # forward output against the dense rlr reference
    status: str = "ok"               # "ok" | "skipped" | "error"
    note: str = ""
    extra: dict = field(default_factory=dict)

    def key(self) -> tuple:
        """Rows with the same key compare with each other (speed-up against "original")."""
        return (self.bench, self.op, self.mode, self.shape, self.device, self.dtype)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Skip(Exception):
    """A method cannot run a configuration here; the message says why (recorded in the row)."""


# ------------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TimingPolicy:
    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 30
    budget_s: float = 2.0          # keep repeating (up to max_repeats) while under this
    slow_call_s: float = 20.0      # a first timed call slower than this is the only one


def time_calls(fn: Callable[[], object], device: torch.device, policy: TimingPolicy) -> tuple:
    """(seconds of each timed call of ``fn``, seconds of the first warm-up call or None)."""
    first = None
    for _ in range(max(policy.warmup, 0)):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        first = time.perf_counter() - start if first is None else first
    times = []
    began = time.perf_counter()
    while len(times) < policy.max_repeats:
        if times:
            if times[0] > policy.slow_call_s:
                break   # a very slow method: one warm call shows it
            if len(times) >= policy.min_repeats and time.perf_counter() - began >= policy.budget_s:
                break
        if device.type == "cuda":
            begin_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            begin_event.record()
            fn()
            end_event.record()
            torch.cuda.synchronize(device)
            times.append(begin_event.elapsed_time(end_event) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return times, first


def summarise(times: list) -> dict:
    """Median, quartiles and range, in milliseconds."""
    ms = sorted(t * 1e3 for t in times)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3, "min_ms": ms[0], "max_ms": ms[-1],
            "repeats": len(ms)}


# ------------------------------------------------------------------------------------ memory


def peak_memory_mb(fn: Callable[[], object], device: torch.device,
                   prepare: Optional[Callable[[], object]] = None) -> float:
    """Peak tensor bytes allocated by one call of ``fn`` above those held before it, in MiB.

    ``prepare`` runs first, outside the measurement: it must free what ``fn`` would free of an
    earlier call (e.g. gradients), since the CPU accounting cannot see frees of blocks allocated
    before it started.
    """
    if prepare is not None:
        prepare()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:   # nbytes > 0: an allocation, < 0: a free
        held += event.nbytes()
        peak = max(peak, held)
    return peak / 2 ** 20


# ------------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_info(device: torch.device) -> dict:
    info = {
        "cpu_model": _cpu_model(),
        "cpu_cores": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device.type,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=round(props.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def machine_name(device: torch.device) -> str:
    """Default results folder name: the GPU name, or cpu-<cores>core-<cpu model>."""
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return f"cpu-{cpu_cores()}core-{slug(_cpu_model())}"


# ------------------------------------------------------------------------------------ GEMM


def gemm_throughput(device: torch.device, dtype: torch.dtype, quick: bool) -> dict:
    """GFLOP/s of a large square matmul on this machine, now (the roofline every row is held to).

    On CUDA with float32 it is measured twice, strict fp32 and with TF32 tensor cores allowed;
    rows are compared with the faster of the two (kernels may use TF32 for fp32 inputs).
    """
    n = (2048 if quick else 4096) if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    policy = TimingPolicy(warmup=2, min_repeats=5, max_repeats=20, budget_s=1.0 if quick else 3.0)
    results = {"size": n, "dtype": str(dtype).replace("torch.", "")}
    variants = [("default", None)]
    if device.type == "cuda" and dtype == torch.float32:
        variants = [("fp32", False), ("tf32", True)]
    best = 0.0
    for name, tf32 in variants:
        previous = torch.backends.cuda.matmul.allow_tf32
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            stats = summarise(time_calls(lambda: a @ b, device, policy)[0])
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        gflops = 2 * n ** 3 / (stats["median_ms"] / 1e3) / 1e9
        results[f"gflops_{name}"] = round(gflops, 1)
        best = max(best, gflops)
    results["gflops"] = round(best, 1)
    return results


def is_baseline(row: Row) -> bool:
    """The original formulation: "original", or "original (<variant>)" in the epoch rows."""
    return row.backend == "original" or row.backend.startswith("original (")


def fill_derived(rows: list, gemm_by_dtype: dict) -> None:
    """Speed-up against the "original" row of the same key; GFLOP/s and % of GEMM."""
    originals = {r.key(): r for r in rows if is_baseline(r) and r.status == "ok"}
    for row in rows:
        if row.status != "ok" or row.median_ms is None:
            continue
        base = originals.get(row.key())
        if base is not None and base.median_ms:
            row.speedup_vs_original = round(base.median_ms / row.median_ms, 3)
        if row.gflop:
            row.gflops = round(row.gflop / (row.median_ms / 1e3), 2)
            gemm = gemm_by_dtype.get(row.dtype, {}).get("gflops")
            if gemm:
                row.pct_of_gemm = round(100 * row.gflops / gemm, 2)


def round_row(row: Row) -> None:
    for name in ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms"):
        value = getattr(row, name)
        if value is not None:
            setattr(row, name, round(value, 4))
    if row.peak_mem_mb is not None:
        row.peak_mem_mb = round(row.peak_mem_mb, 2)
    if row.gflop is not None:
        row.gflop = round(row.gflop, 4)


def error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."
