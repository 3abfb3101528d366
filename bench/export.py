"""rlr's own inference against generic runtimes on rlr's exported graph, side by side in one process.

    python -m bench.export --run RUN --images DIR [--onnx FILE] [--batch 8] [--repeats 9] [--threads N] [--out DIR]

Every method takes the same decoded uint8 batch at the model's input size and returns the image
scores and blurred maps:

- ``rlr fp32`` / ``rlr bf16``: ``rlr.load(RUN[, precision="bf16"]).score_images`` (the backbone's
  "fast" runtime, the levels' inference copy on the fastest rlr_kernels backend, scoring, blur): what
  ``rlr predict``, ``rlr serve`` and ``rlr.load`` run;
- ``rlr fp32 eager`` / ``rlr bf16 eager``: the same with ``runtime="eager"`` (timm's module as built,
  autocast for bf16): the path of rlr before the fast runtime, and the reference of the score
  differences;
- ``onnxruntime fp32``: the file ``rlr export`` writes, CPU provider;
- ``openvino fp32`` / ``openvino bf16``: the same ONNX file compiled by OpenVINO for its CPU plugin
  with the inference precision hint f32, and with its default (bf16 where the CPU multiplies bf16
  natively: then that is what an OpenVINO user gets without asking).

Each runtime uses its default thread count (the machine's cores) unless ``--threads`` sets all of
them. The calls are interleaved (one call of each method per round, ``--repeats`` rounds after two
warm-up calls each), so a load that comes and goes on a shared machine hits every method alike;
rows report the median, quartiles and min of the calls, images/s at the median, the speed against
onnxruntime fp32, the largest relative score difference against ``rlr fp32 eager`` and the first
call's time (graph building or compiling). A method whose package is missing or that cannot run
here (bf16 without native bf16) is listed with the reason. Writes DIR/export.json and export.md
(DIR default bench/results/<machine>/; ``--threads N`` adds ``-Nthread(s)`` to the names, an
``OMP_WAIT_POLICY`` in the environment ``-omp-<policy>``).
Methodology: docs/bench.md; figures: docs/usage.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rlr.atomic import atomic_write_json, atomic_write_text
from rlr.backbone import resize_image
from rlr.data import load_image
from rlr.export import export
from rlr.inference import bf16_is_native, collect_images, load

from .common import machine_info, machine_name

REFERENCE = "rlr fp32 eager"
BASELINE = "onnxruntime fp32"
METHODS = ("rlr fp32", "rlr bf16", "rlr fp32 eager", "rlr bf16 eager", "onnxruntime fp32", "openvino fp32",
           "openvino bf16")


class Unavailable(Exception):
    """A method that cannot run here; the message says why."""


def _rlr(run, precision: str, runtime: str, images: list):
    if precision == "bf16" and not bf16_is_native(torch.device("cpu")):
        raise Unavailable("this CPU does not multiply bf16 natively (no AMX, no AVX512-BF16)")
    detector = load(run, "cpu", precision, runtime=runtime)
    return lambda: detector.score_images(images)


def _onnxruntime(onnx_file: Path, threads, batch: np.ndarray):
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise Unavailable(f"onnxruntime is not installed ({err}): pip install onnxruntime") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"image": batch})


def _openvino(onnx_file: Path, threads, batch: np.ndarray, precision: str):
    try:
        import openvino as ov
    except ImportError as err:
        raise Unavailable(f"openvino is not installed ({err}): pip install openvino") from None
    core = ov.Core()
    default = str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
    config = {}
    if precision == "fp32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    elif "bf16" not in default and "bfloat16" not in default:
        raise Unavailable(f"OpenVINO's CPU plugin runs {default} by default here (bf16 only where the CPU has it)")
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(core.read_model(str(onnx_file)), "CPU", config)
    request = compiled.create_infer_request()

    def call():
        outputs = request.infer({0: batch})
        return [outputs[compiled.output(i)] for i in range(len(compiled.outputs))]
    return call


def _scores(method: str, output) -> np.ndarray:
    """The image scores of a method's output: rlr gives (scores, maps); the runtimes (score, map)."""
    return np.asarray(output[0], dtype=np.float64)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--images", required=True, help="folder of images (the first --batch are used)")
    p.add_argument("--onnx", help="an exported file of the run (default: export one to a temporary folder)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (one call of every method each)")
    p.add_argument("--threads", type=int, help="threads of every runtime (default: each runtime's own, the cores)")
    p.add_argument("--methods", help=f"comma-separated subset of: {', '.join(METHODS)}")
    p.add_argument("--out", type=Path, help="output folder (default bench/results/<machine>/)")
    args = p.parse_args(argv)
    methods = METHODS if not args.methods else tuple(m.strip() for m in args.methods.split(","))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    out = args.out or Path(__file__).resolve().parent / "results" / machine_name(device)
    stem = "export" + ("" if not args.threads else f"-{args.threads}thread" + ("s" if args.threads > 1 else ""))
    if os.environ.get("OMP_WAIT_POLICY"):   # torch's OpenMP threads sleep (passive) or spin while they wait
        stem += f"-omp-{os.environ['OMP_WAIT_POLICY'].lower()}"

    size = load(args.run, "cpu").input_size
    paths = collect_images([args.images])[:args.batch]
    images = [resize_image(load_image(path), size) for path in paths]
    batch = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))
    with tempfile.TemporaryDirectory() as folder:
        onnx_file = Path(args.onnx) if args.onnx else export(args.run, Path(folder) / "model.onnx", log=lambda *_: None)
        makers = {
            "rlr fp32": lambda: _rlr(args.run, "fp32", "fast", images),
            "rlr bf16": lambda: _rlr(args.run, "bf16", "fast", images),
            "rlr fp32 eager": lambda: _rlr(args.run, "fp32", "eager", images),
            "rlr bf16 eager": lambda: _rlr(args.run, "bf16", "eager", images),
            "onnxruntime fp32": lambda: _onnxruntime(onnx_file, args.threads, batch),
            "openvino fp32": lambda: _openvino(onnx_file, args.threads, batch, "fp32"),
            "openvino bf16": lambda: _openvino(onnx_file, args.threads, batch, "bf16"),
        }
        calls, rows = {}, {}
        for method in methods:
            try:
                start = time.perf_counter()
                call = makers[method]()
                output = call()   # the first call builds (rlr's fast network) or compiles (OpenVINO) what it runs
                first = time.perf_counter() - start
            except Unavailable as err:
                rows[method] = {"method": method, "status": "unavailable", "note": str(err)}
                continue
            calls[method] = call
            rows[method] = {"method": method, "status": "ok", "first_call_s": round(first, 3),
                            "scores": _scores(method, output)}
        for call in calls.values():   # second warm-up call
            call()
        seconds = {method: [] for method in calls}
        for _ in range(args.repeats):
            for method, call in calls.items():
                start = time.perf_counter()
                call()
                seconds[method].append(time.perf_counter() - start)

    reference = rows.get(REFERENCE, {}).get("scores")
    for method, times in seconds.items():
        row = rows[method]
        q1, median, q3 = np.percentile(times, [25, 50, 75])
        row.update(median_ms=round(1000 * median, 2), q1_ms=round(1000 * q1, 2), q3_ms=round(1000 * q3, 2),
                   min_ms=round(1000 * min(times), 2), images_per_s=round(len(images) / median, 2))
        scores = row.pop("scores")
        if reference is not None:
            row["max_relative_score_difference"] = float(np.max(np.abs(scores - reference) / np.abs(reference)))
    base = rows.get(BASELINE, {}).get("median_ms")
    for row in rows.values():
        row.pop("scores", None)
        if base and row.get("median_ms"):
            row["vs_onnxruntime_fp32"] = round(base / row["median_ms"], 3)
    versions = {"torch": torch.__version__}
    for name in ("onnxruntime", "openvino"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    result = {"machine": machine_info(device), "versions": versions,
              "command": "python -m bench.export " + " ".join(argv if argv is not None else sys.argv[1:]),
              "run": str(args.run), "images": [str(p) for p in paths], "batch": len(images), "input_size": size,
              "repeats": args.repeats, "threads": args.threads or "default", "torch_threads": torch.get_num_threads(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (spins before sleeping)"),
              "load_average": [round(x, 2) for x in os.getloadavg()],
              "rows": [rows[m] for m in methods if m in rows]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{stem}.json", result)
    atomic_write_text(out / f"{stem}.md", markdown(result))
    print(markdown(result))
    print(f"-> {out / (stem + '.json')}, {out / (stem + '.md')}")
    return result


def markdown(result: dict) -> str:
    machine = result["machine"]
    threads = result["threads"]
    lines = [f"# rlr against onnxruntime and OpenVINO on rlr's exported graph ({machine['cpu_model']}, "
             f"{machine['cpu_cores']} cores, threads: {threads})", "",
             f"Command: `{result['command']}`. Batch of {result['batch']} images at {result['input_size']} px, "
             f"decoded beforehand; {result['repeats']} interleaved rounds after two warm-up calls; OpenMP wait policy "
             f"{result['omp_wait_policy']}; load average at the end {result['load_average'][0]} on "
             f"{machine['cpu_cores']} cores. Versions: "
             + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v) + ".", "",
             *(["**The machine was busy** (load average above its core count, other jobs included): compare the rows "
                "of this table, not these times with another run's.", ""]
               if result["load_average"][0] > machine["cpu_cores"] + 1 else []),
             "| method | images/s | median (q1-q3) ms | min ms | × onnxruntime fp32 | max rel. score diff vs rlr fp32 eager "
             "| first call s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['method']} | – | – | – | – | – | {row['note']} |")
            continue
        diff = row.get("max_relative_score_difference")
        lines.append(f"| {row['method']} | {row['images_per_s']:.1f} | {row['median_ms']:.1f} ({row['q1_ms']:.1f}-"
                     f"{row['q3_ms']:.1f}) | {row['min_ms']:.1f} | {row.get('vs_onnxruntime_fp32', float('nan')):.2f} | "
                     f"{'–' if diff is None else f'{diff:.1e}'} | {row['first_call_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
