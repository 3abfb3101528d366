"""Run the rlr bench: ``python -m bench [--quick] [--device cpu|cuda] [--out DIR]``.

Kernel suite (bench/kernels.py) and end-to-end suite (bench/end_to_end.py), side by side against
the original formulation, on whatever backends this machine has; writes DIR/results.json,
DIR/results.md and DIR/kernels_time_vs_tokens.png (default DIR: bench/results/<machine>/).
Methodology: docs/bench.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch

from . import end_to_end, kernels, report
from .common import TimingPolicy, fill_derived, gemm_throughput, machine_info, machine_name

SUITES = ("kernels", "end_to_end")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def timing_policies(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        kernel = TimingPolicy(warmup=3, min_repeats=10, max_repeats=200, budget_s=0.5 if quick else 2.0,
                              slow_call_s=30.0)
        e2e = TimingPolicy(warmup=3, min_repeats=10, max_repeats=100, budget_s=1.0 if quick else 3.0,
                           slow_call_s=30.0)
    elif quick:
        kernel = TimingPolicy(warmup=1, min_repeats=3, max_repeats=15, budget_s=0.8, slow_call_s=8.0)
        e2e = TimingPolicy(warmup=1, min_repeats=3, max_repeats=10, budget_s=1.5, slow_call_s=8.0)
    else:
        kernel = TimingPolicy(warmup=2, min_repeats=5, max_repeats=50, budget_s=3.0, slow_call_s=30.0)
        e2e = TimingPolicy(warmup=2, min_repeats=5, max_repeats=30, budget_s=5.0, slow_call_s=60.0)
    return {"kernels": kernel, "end_to_end": e2e}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer configurations and repeats on a CPU (fits 15 minutes on 2 cores); a GPU runs all")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="device to bench (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: bench/results/<machine>/)")
    p.add_argument("--suite", choices=SUITES, action="append",
                   help="run only this suite (repeatable; default: both)")
    p.add_argument("--dtype", choices=sorted(DTYPES), action="append",
                   help="kernel-suite dtype (repeatable; default: float32 on CPU, float32 and bfloat16 on CUDA)")
    p.add_argument("--methods", default=None,
                   help="comma-separated kernel methods to run (default: all, e.g. original,sdpa,rlr-cpp)")
    p.add_argument("--exclude-methods", default=None,
                   help="comma-separated kernel methods to leave out (e.g. flex-compiled: its compilations "
                        "dominate a GPU run's time)")
    p.add_argument("--dense-cap-gb", type=float, default=None,
                   help="skip dense methods whose (B*H*L*L) score tensor exceeds this (default: CPU 2.5, CUDA 24)")
    p.add_argument("--no-epoch", action="store_true", help="skip the realmini epoch rows")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    suites = args.suite or list(SUITES)
    dtypes = [DTYPES[d] for d in (args.dtype or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"]))]
    cap_gb = args.dense_cap_gb if args.dense_cap_gb is not None else (
        24.0 if device.type == "cuda" else 2.5)
    known = set(kernels.methods(device))
    for option, value in (("--methods", args.methods), ("--exclude-methods", args.exclude_methods)):
        unknown = set(value.split(",")) - known if value else set()
        if unknown:
            print(f"{option}: unknown kernel methods {sorted(unknown)}; on {device.type} there are {sorted(known)}",
                  file=sys.stderr)
            return 2
    out = args.out or Path(__file__).resolve().parent / "results" / machine_name(device)
    out.mkdir(parents=True, exist_ok=True)
    policies = timing_policies(device, args.quick)

    print(f"rlr bench on {device} -> {out}", flush=True)
    meta = {
        "machine_name": machine_name(device),
        "machine": machine_info(device),
        "backends": kernels.backend_report(device),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "settings": {"quick": args.quick, "device": device.type, "suites": suites,
                     "kernel_dtypes": [str(d).replace("torch.", "") for d in dtypes], "dense_cap_gb": cap_gb,
                     "timing": {k: dataclasses.asdict(v) for k, v in policies.items()}},
    }
    print(f"machine: {meta['machine']}", flush=True)
    print(f"backends: {meta['backends']}", flush=True)
    gemm = {}
    for dtype in sorted(set(dtypes) | {torch.float32}, key=str):
        gemm[str(dtype).replace("torch.", "")] = gemm_throughput(device, dtype, args.quick)
    # End-to-end rows under bf16 autocast are held to the bf16 GEMM.
    if "bfloat16" in gemm:
        gemm["bf16-autocast"] = gemm["bfloat16"]
    meta["gemm"] = gemm
    print(f"GEMM: {gemm}", flush=True)

    def log(line):
        print(line, flush=True)

    rows = []

    def save():
        fill_derived(rows, gemm)
        meta["wall_s"] = round(time.perf_counter() - started, 1)
        report.write_json(out / "results.json", meta, rows)
        report.write_plot(out / report.PLOT_FILE, rows)
        report.write_markdown(out / "results.md", meta, rows)

    if "kernels" in suites:
        only = set(args.methods.split(",")) if args.methods else None
        exclude = set(args.exclude_methods.split(",")) if args.exclude_methods else set()
        rows += kernels.run_kernels(device, dtypes, args.quick, policies["kernels"], int(cap_gb * 2 ** 30), log,
                                    only_methods=only, exclude_methods=exclude)
        save()
    if "end_to_end" in suites:
        rows += end_to_end.run_end_to_end(device, args.quick, policies["end_to_end"], log,
                                          with_epoch=not args.no_epoch)
        save()
    save()
    failed = sum(r.status == "error" for r in rows)
    print(f"done in {time.perf_counter() - started:.0f} s: {len(rows)} rows ({failed} errors) -> "
          f"{out / 'results.json'}, {out / 'results.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
