"""Writes a bench run: DIR/results.json, DIR/results.md (tables) and DIR/kernels_time_vs_tokens.png."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .common import Row

PLOT_FILE = "kernels_time_vs_tokens.png"


def write_json(path: Path, meta: dict, rows: list) -> Path:
    path.write_text(json.dumps(dict(meta, rows=[r.to_dict() for r in rows]), indent=1) + "\n")
    return path


def _fmt(value, digits=2, suffix=""):
    if value is None:
        return "–"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}{suffix}"
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _spread(row: Row) -> str:
    if row.q1_ms is None or row.repeats < 2:
        return "–"
    return f"{_ms(row.q1_ms)}–{_ms(row.q3_ms)} (min {_ms(row.min_ms)}, max {_ms(row.max_ms)})"


def _status(row: Row) -> str:
    return "" if row.status == "ok" else f"**{row.status}**: "


def _kernel_table(rows: list) -> list:
    lines = ["| shape | backend | median ms | IQR (range) | n | speed-up vs original | peak MiB | GFLOP/s | % of GEMM "
             "| max abs err | note |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        err = "–" if r.max_abs_err is None else f"{r.max_abs_err:.1e}"
        lines.append(f"| {r.shape} | {r.backend} | {_fmt(r.median_ms, 3)} | {_spread(r)} | {r.repeats} | "
                     f"{_fmt(r.speedup_vs_original, 2, '×')} | {_fmt(r.peak_mem_mb, 1)} | {_fmt(r.gflops, 1)} | "
                     f"{_fmt(r.pct_of_gemm, 1, '%')} | {err} | {_status(r)}{r.note} |")
    return lines


def _e2e_table(rows: list) -> list:
    lines = ["| shape | backend | median ms | IQR (range) | n | images/s | speed-up vs original | peak MiB | note |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.shape} | {r.backend} | {_fmt(r.median_ms, 1)} | {_spread(r)} | {r.repeats} | "
                     f"{_fmt(r.throughput, 1)} | {_fmt(r.speedup_vs_original, 2, '×')} | {_fmt(r.peak_mem_mb, 1)} | "
                     f"{_status(r)}{r.note} |")
    return lines


def write_markdown(path: Path, meta: dict, rows: list) -> Path:
    m = meta["machine"]
    lines = [f"# rlr bench: {meta['machine_name']}", "",
             f"Run {meta['started']} with `{meta['command']}` ({meta['wall_s']:.0f} s).", "",
             "## Machine", "",
             f"- CPU: {m['cpu_model']}, {m['cpu_cores']} cores (torch threads: {m['torch_threads']})",
             f"- GPU: {m.get('gpu', 'none')}" + (f", {m['gpu_memory_gb']} GiB, CUDA {m['cuda']}" if m.get("gpu") else ""),
             f"- torch {m['torch']}, triton {m.get('triton')}, Python {m['python']}, {m['platform']}", ""]
    lines += ["Backends on this device:", ""]
    lines += [f"- `{name}`: {status}" for name, status in meta["backends"].items()]
    lines += ["", "GEMM throughput (large square matmul, same run): " + "; ".join(
        f"{dtype}: {g['gflops']:,.1f} GFLOP/s (n={g['size']}"
        + (f", strict fp32 {g['gflops_fp32']:,.1f}, TF32 {g['gflops_tf32']:,.1f}" if "gflops_tf32" in g else "") + ")"
        for dtype, g in meta["gemm"].items()), ""]
    lines += ["Times in milliseconds per call (median over repeats; IQR = interquartile range). Peak memory: "
              "tensor bytes allocated above those held before the call. See docs/bench.md for the method.", ""]

    groups = defaultdict(list)
    for r in rows:
        groups[(r.bench, r.dtype, r.op, r.mode)].append(r)
    for (bench, dtype, op, mode), group in groups.items():
        lines += [f"## {bench}: {op} {mode} ({dtype}, {group[0].device})", ""]
        lines += _kernel_table(group) if bench == "kernels" else _e2e_table(group)
        lines.append("")
    if (path.parent / PLOT_FILE).exists():
        lines += ["## Time against tokens", "", f"![time against tokens]({PLOT_FILE})", ""]
    path.write_text("\n".join(lines))
    return path


def write_plot(path: Path, rows: list) -> Path | None:
    """Median time against tokens L per backend: one panel per (op, mode), kernel rows only."""
    rows = [r for r in rows if r.bench == "kernels" and r.status == "ok" and r.median_ms]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r.dtype for r in rows})
    ops, modes = ("local", "masked"), ("fwd", "fwd+bwd")
    fig, axes = plt.subplots(len(dtypes) * len(ops), len(modes), figsize=(6.5 * len(modes), 4.6 * len(dtypes) * len(ops)),
                             squeeze=False)
    backends = sorted({r.backend for r in rows})
    others = [b for b in backends if b != "original"]
    colours = {b: plt.cm.tab10(i % 10) for i, b in enumerate(others)}
    colours["original"] = "black"   # the baseline stands out
    batches = sorted({r.batch for r in rows})
    styles = {b: s for b, s in zip(batches, ("-", "--", ":", "-."))}
    for i, (dtype, op) in enumerate((dtype, op) for dtype in dtypes for op in ops):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for backend in backends:
                for batch in batches:
                    pts = sorted((r.tokens, r.median_ms) for r in rows if r.dtype == dtype and r.op == op
                                 and r.mode == mode and r.backend == backend and r.batch == batch)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[batch], marker="o",
                                color=colours[backend], label=f"{backend} B{batch}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens L (16x16 d64 w5, 32x32 d32 w7, 64x64 d32 w11)", fontsize=8)
            ax.set_ylabel("median ms per call")
            ax.set_title(f"{op} {mode} ({dtype}, {rows[0].device})")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
