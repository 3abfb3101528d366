"""A roofline model of every Triton launch at the bench's shapes, and, on a GPU, the measured time
held against it.

    python -m tools.roofline                          # predictions: H100 and H200, bf16, bench shapes
    python -m tools.roofline --dtype float32 --json roofline.json
    python -m tools.roofline --write-docs             # regenerate the table of docs/kernels.md
    python -m tools.roofline --measure --json out.json   # on a GPU: each launch timed (torch.profiler)

For each op (forward, then backward) and each kernel shape of ``bench/kernels.py`` (the paper's
two levels at batch 4 and 16, and 64x64), the launches are those the launchers issue on the GPU
(``rlr_kernels/triton/aot.py``: same tiles, warps, grid and batch splits). Per launch, counted
from the kernel's own loops (tiles visited, not useful pairs: masked lanes and padding count):

- tensor FLOPs: 2*M*N*K of every ``tl.dot`` of every tile the programs visit; fp32 inputs at
  torch's default "highest" precision run each dot as three TF32 products (``tf32x3``): 3x.
- exp2: one per score element of every visited tile (the softmax's, or its recomputation).
- bytes: every tensor the launch reads or writes, once (compulsory DRAM traffic: re-reads of a
  tile are assumed to hit L2; the shared k, v of a head are at most a few MiB).

Predicted time = max(tensor FLOPs / tensor peak, exp2 / SFU peak, bytes / memory peak); the largest
term names the bound. A launch with fewer programs than SMs cannot use the whole GPU: its compute
terms are scaled by SMs / programs. Launch latency (a few microseconds per kernel) is not modelled,
so launches predicted well under ~5 us will measure at about that floor.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "kernels.md"
BEGIN, END = "<!-- roofline:begin -->", "<!-- roofline:end -->"


@dataclass(frozen=True)
class Peak:
    """Peak throughputs of one GPU (dense, no sparsity)."""

    gpu: str
    capability: int
    sms: int
    tensor_16bit: float      # FLOP/s, bf16/fp16 operands, fp32 accumulation
    tensor_tf32: float       # FLOP/s
    memory: float            # bytes/s
    sfu: float               # exp2 per second: 16 per SM per clock

    def tensor(self, dtype: str) -> float:
        return self.tensor_tf32 if dtype == "float32" else self.tensor_16bit


# NVIDIA H100 Tensor Core GPU datasheet (H100 SXM) and NVIDIA H200 Tensor Core GPU datasheet (H200 SXM):
# BF16/FP16 tensor 1,979 TFLOPS and TF32 989 TFLOPS *with sparsity*, i.e. 989.4 / 494.7 dense; HBM3
# 3.35 TB/s (H100 SXM), HBM3e 4.8 TB/s (H200). Both are GH100 with 132 SMs; 989.4e12 / (132 SMs x
# 4096 FLOP/clock/SM) = 1.83 GHz, the clock of those figures. SFU: 16 exp2 per SM per clock (CUDA C
# Programming Guide, "Arithmetic Instructions" throughput table, compute capability 9.0) x 132 x
# 1.83 GHz = 3.87e12/s (FlashAttention-3, Shah et al. 2024, sec. 3: "3.9 TFLOPS of special functions").
_CLOCK = 989.4e12 / (132 * 4096)
PEAKS = {
    "h100": Peak("H100 SXM", 90, 132, 989.4e12, 494.7e12, 3.35e12, 16 * 132 * _CLOCK),
    "h200": Peak("H200 SXM", 90, 132, 989.4e12, 494.7e12, 4.8e12, 16 * 132 * _CLOCK),
}


@dataclass
class Work:
    """What one launch does, counted from its loops."""

    op: str
    pass_: str              # "fwd" | "bwd"
    shape: str              # the bench's label, e.g. "B4 H8 32x32 d32 w7"
    dtype: str
    kernel: str
    programs: int
    config: str
    tensor_flops: float     # issued (tf32x3 counted three times)
    exp2: float
    bytes: float

    def predict(self, peak: Peak) -> tuple:
        """(seconds, bound) on ``peak``."""
        idle = max(1.0, peak.sms / max(self.programs, 1))
        terms = {"tensor": self.tensor_flops / peak.tensor(self.dtype) * idle,
                 "exp2": self.exp2 / peak.sfu * idle,
                 "memory": self.bytes / peak.memory}
        bound = max(terms, key=terms.get)
        return terms[bound], bound


# ------------------------------------------------------------------------------------ loop counts


def _rows_in_reach(start: int, block: int, L: int, width: int, height: int, half: int) -> tuple:
    """utils.rows_in_reach: the token range of the grid rows within ``half`` rows of a block."""
    first_row, last_row = start // width, (min(start + block, L) - 1) // width
    return max(first_row - half, 0) * width, min(last_row + half + 1, height) * width


def _window_ranges(start, block, other, L, width, height, half) -> tuple:
    """masked_key_attention._window_ranges: the reach widened to multiples of ``other``."""
    lo, hi = _rows_in_reach(start, block, L, width, height, half)
    return (lo // other) * other, min(-(-hi // other) * other, L)


def _tiles(lo: int, hi: int, step: int) -> int:
    return max(0, -(-(hi - lo) // step))


def _masked_tiles(start, block, other, L, width, height, half) -> int:
    """Tiles of the three loops [0, lo), [lo, hi), [hi, L) of the masked kernels."""
    lo, hi = _window_ranges(start, block, other, L, width, height, half)
    return _tiles(0, lo, other) + _tiles(lo, hi, other) + _tiles(hi, L, other)


# MMA products per visited tile, each 2 * BLOCK_M * BLOCK_N * BLOCK_D FLOPs: the forward's s = q k^T and
# p v; the delta pass recomputes both; dq: s, dp = dO v^T, dq += ds k; dk/dv: s^T, dv += p^T dO,
# dp^T = v dO^T, dk += ds^T q.
_PRODUCTS = {"_local_fwd_kernel": 2, "_local_bwd_delta_kernel": 2, "_local_bwd_dq_kernel": 3,
             "_local_bwd_dkdv_kernel": 4, "_masked_fwd_kernel": 2, "_masked_bwd_dq_kernel": 3,
             "_masked_bwd_dkdv_kernel": 4, "_row_dot_kernel": 0}


def launch_work(launch, shape, op: str, pass_: str, dtype: str) -> Work:
    """The work of one recorded launch (``utils.Launch``) of ``op`` at the bench ``shape``."""
    name = launch.kernel.__name__
    meta = launch.meta
    B, H, R, d = shape.batch, shape.heads, shape.copies if op == "local" else 1, shape.head_dim
    L, width, height, half = shape.tokens, shape.width, shape.height, shape.window // 2
    bm, bn, bd = meta.get("BLOCK_M"), meta.get("BLOCK_N"), meta.get("BLOCK_D")
    programs = math.prod(launch.grid)
    tiles = 0   # (query tile x key tile) blocks visited by all programs together
    if name in ("_local_fwd_kernel", "_local_bwd_delta_kernel", "_local_bwd_dq_kernel"):
        per_row_block = sum(_tiles(*_rows_in_reach(m, bm, L, width, height, half), bn) for m in range(0, L, bm))
        tiles = B * H * R * per_row_block
    elif name == "_local_bwd_dkdv_kernel":
        per_key_block = sum(_tiles(*_rows_in_reach(n, bn, L, width, height, half), bm) for n in range(0, L, bn))
        tiles = R * H * B * per_key_block
    elif name in ("_masked_fwd_kernel", "_masked_bwd_dq_kernel"):
        tiles = B * H * sum(_masked_tiles(m, bm, bn, L, width, height, half) for m in range(0, L, bm))
    elif name == "_masked_bwd_dkdv_kernel":
        tiles = H * B * sum(_masked_tiles(n, bn, bm, L, width, height, half) for n in range(0, L, bn))
    elif name != "_row_dot_kernel":
        raise ValueError(f"no work model for kernel {name}")
    flops = tiles * _PRODUCTS[name] * 2.0 * (bm or 0) * (bn or 0) * (bd or 0)
    if meta.get("PRECISION") == "tf32x3":
        flops *= 3
    exp2 = tiles * float(bm or 0) * (bn or 0)
    nbytes = sum(a.numel() * a.element_size() for a in launch.args if hasattr(a, "element_size"))
    config = "" if bn is None else f"{bm}×{bn} w{meta['num_warps']} s{meta['num_stages']}"
    return Work(op, pass_, shape.label, dtype, name, programs, config, flops, exp2, float(nbytes))


PARTIALS = "torch: sum of batch-split partials"


def _partials_work(launches, op, pass_, shape, dtype) -> Optional[Work]:
    """The torch sum of the dk (and dv) batch-split partials after a dk/dv launch with splits > 1."""
    dkdv = [x for x in launches if x.kernel.__name__.endswith("dkdv_kernel")]
    if not dkdv or dkdv[0].grid[2] == 1:
        return None
    partials = dkdv[0].args[6:8] if op == "local" else dkdv[0].args[6:7]
    read = sum(p.numel() * p.element_size() for p in partials)
    written = sum(p[0].numel() for p in partials) * (4 if dtype == "float32" else 2)
    return Work(op, pass_, shape.label, dtype, PARTIALS, 0, "", 0.0, 0.0,
                float(read + written))


def model(dtype: str = "bfloat16", target_key: str = "h100", shapes=None) -> list:
    """Every launch's ``Work`` at the bench's shapes, forward then backward of each op. The launch
    configuration is the one chosen for ``PEAKS[target_key]``'s architecture and SM count."""
    import torch

    from rlr_kernels.triton import aot
    from rlr_kernels.triton.utils import GpuTarget
    peak = PEAKS[target_key]
    target = GpuTarget(peak.capability, peak.sms)
    torch_dtype = getattr(torch, dtype)
    shapes = shapes if shapes is not None else bench_shapes()
    works = []
    for shape in shapes:
        problem = aot.Problem(head_dim=shape.head_dim, batch=shape.batch, heads=shape.heads, height=shape.height,
                              width=shape.width, window=shape.window, copies=shape.copies)
        for op in ("local", "masked"):
            forward, backward = aot.pass_launches(op, problem, torch_dtype, target)
            works += [launch_work(x, shape, op, "fwd", dtype) for x in forward]
            works += [launch_work(x, shape, op, "bwd", dtype) for x in backward]
            partials = _partials_work(backward, op, "bwd", shape, dtype)
            if partials is not None:
                works.append(partials)
    return works


# ------------------------------------------------------------------------------------ measured


def measure(works: list, shapes: list, repeats: int = 20) -> dict:
    """On a GPU: {(shape, op, pass, kernel): microseconds per call}, each launcher's kernels timed by
    torch.profiler over ``repeats`` calls after a warm-up. The backward's non-Triton kernels (the sum
    of the batch-split partials and its cast) are filed under ``PARTIALS``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.kernels import make_inputs
    from rlr_kernels.triton import local_reference_attention as local_mod, masked_key_attention as masked_mod
    by_label = {s.label: s for s in shapes}
    kernels_of = {}
    for w in works:
        kernels_of.setdefault((w.shape, w.op, w.dtype), set()).add(w.kernel)
    measured = {}
    for (label, op, dtype), kernels in kernels_of.items():
        shape = by_label[label]
        x = make_inputs(op, shape, torch.device("cuda"), getattr(torch, dtype))
        fwd, bwd = ((local_mod.local_forward, local_mod.local_backward) if op == "local"
                    else (masked_mod.masked_forward, masked_mod.masked_backward))
        grid = (shape.height, shape.width, shape.window)
        out, lse = fwd(x["q"], x["k"], x["v"], *grid)
        calls = {"fwd": lambda: fwd(x["q"], x["k"], x["v"], *grid),
                 "bwd": lambda: bwd(x["q"], x["k"], x["v"], out, lse, x["grad"], *grid)}
        for pass_, call in calls.items():
            call()                                      # compiles, and warms up
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(repeats):
                    call()
                torch.cuda.synchronize()
            for item in prof.key_averages():
                total = getattr(item, "device_time_total", None)
                if total is None:                       # older torch
                    total = getattr(item, "cuda_time_total", 0.0)
                if not total:
                    continue
                name = item.key if item.key in kernels else (
                    PARTIALS if pass_ == "bwd" and PARTIALS in kernels else f"torch: other kernels ({pass_})")
                key = (label, op, pass_, name)
                measured[key] = measured.get(key, 0.0) + total / repeats
    return measured


def bench_shapes() -> list:
    """The kernel shapes of the bench's GPU run (``bench/kernels.py``)."""
    import torch

    from bench.kernels import kernel_shapes
    return kernel_shapes(quick=False, device=torch.device("cuda"))


# ------------------------------------------------------------------------------------ output


def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"


def markdown(works: list, measured: Optional[dict] = None, measured_gpu: str = "") -> str:
    lines = ["| shape | op | pass | launch | tiles, warps, stages | programs | tensor GFLOP | exp2 (M) | MB "
             "| H100 µs (bound) | H200 µs (bound) |" + (f" measured µs ({measured_gpu}) |" if measured else ""),
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if measured else "")]
    for w in works:
        cells = [w.shape, w.op, w.pass_, f"`{w.kernel}`" if not w.kernel.startswith("torch") else w.kernel,
                 w.config or "–", str(w.programs or "–"), f"{w.tensor_flops / 1e9:.2f}", f"{w.exp2 / 1e6:.1f}",
                 f"{w.bytes / 1e6:.1f}"]
        for key in ("h100", "h200"):
            seconds, bound = w.predict(PEAKS[key])
            cells.append(f"{_us(seconds)} ({bound})")
        if measured:
            value = measured.get((w.shape, w.op, w.pass_, w.kernel))
            cells.append("–" if value is None else f"{value:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    totals = {}
    for w in works:
        for key in ("h100", "h200"):
            totals[(w.shape, w.op, w.pass_, key)] = totals.get((w.shape, w.op, w.pass_, key), 0.0) + w.predict(
                PEAKS[key])[0]
    lines += ["", "Per op and pass, the sum of its launches (µs, launch latency not included):", "",
              "| shape | op | fwd H100 | fwd+bwd H100 | fwd H200 | fwd+bwd H200 |", "|---|---|---:|---:|---:|---:|"]
    for shape, op in dict.fromkeys((w.shape, w.op) for w in works):
        row = [shape, op]
        for key in ("h100", "h200"):
            f = totals.get((shape, op, "fwd", key), 0.0)
            b = totals.get((shape, op, "bwd", key), 0.0)
            row += [_us(f), _us(f + b)]
        lines.append("| " + " | ".join(row[:2] + [row[2], row[3], row[4], row[5]]) + " |")
    return "\n".join(lines) + "\n"


def write_docs(works: list, path: Path = DOCS) -> None:
    from rlr.atomic import atomic_write_text
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise RuntimeError(f"{path} has no {BEGIN} ... {END} block to fill")
    body = "\n".join([BEGIN, "", f"Generated by `python -m tools.roofline --write-docs` ({works[0].dtype}, launch "
                      "configuration for sm_90 with 132 SMs).", "", markdown(works), END])
    head, rest = text.split(BEGIN, 1)
    atomic_write_text(path, head + body + rest.split(END, 1)[1])


def report(works: list, measured: dict, gpu_name: str) -> dict:
    """The JSON record: every launch with its predictions and, where timed, its measured time."""
    key = "h200" if "H200" in gpu_name.upper() else "h100"
    rows = []
    for w in works:
        row = asdict(w)
        for name, peak in PEAKS.items():
            seconds, bound = w.predict(peak)
            row[f"predicted_us_{name}"], row[f"bound_{name}"] = seconds * 1e6, bound
        value = measured.get((w.shape, w.op, w.pass_, w.kernel))
        row["measured_us"] = value
        if value is not None and row[f"predicted_us_{key}"] > 0:
            row["measured_over_predicted"] = value / row[f"predicted_us_{key}"]
        rows.append(row)
    for (shape, op, pass_, kernel), value in measured.items():
        if not any((w.shape, w.op, w.pass_, w.kernel) == (shape, op, pass_, kernel) for w in works):
            rows.append(dict(shape=shape, op=op, pass_=pass_, kernel=kernel, measured_us=value))
    ratios = [r["measured_over_predicted"] for r in rows if r.get("measured_over_predicted")]
    return {"gpu": gpu_name, "compared_with": PEAKS[key].gpu if measured else None, "peaks": {
        k: asdict(v) for k, v in PEAKS.items()}, "rows": rows,
        "median_measured_over_predicted": statistics.median(ratios) if ratios else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.roofline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--measure", action="store_true", help="time every launch on this machine's GPU")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per pass with --measure (default 20)")
    p.add_argument("--json", type=Path, help="write predictions (and measurements) to this file")
    p.add_argument("--write-docs", action="store_true", help=f"regenerate the table in {DOCS.relative_to(REPO)}")
    args = p.parse_args(argv)
    import os
    if os.environ.get("TRITON_INTERPRET") == "1" and args.measure:
        p.error("--measure runs the compiled kernels: unset TRITON_INTERPRET")
    shapes = bench_shapes()
    works = model(args.dtype, "h100", shapes)
    measured, gpu_name = {}, ""
    if args.measure:
        import torch
        if not torch.cuda.is_available():
            p.error("--measure needs a CUDA GPU")
        gpu_name = torch.cuda.get_device_name()
        measured = measure(works, shapes, args.repeats)
    print(markdown(works, measured, gpu_name))
    if args.json:
        from rlr.atomic import atomic_write_json
        atomic_write_json(args.json, report(works, measured, gpu_name))
    if args.write_docs:
        write_docs(works)
    return 0


if __name__ == "__main__":
    sys.exit(main())
