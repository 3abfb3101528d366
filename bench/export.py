"""onnxruntime against rlr's own inference, side by side in one run, on the same image batch.

    python -m bench.export --run RUN --images DIR [--onnx FILE] [--batch 8] [--repeats 5] [--out FILE.json]

Both paths take the decoded uint8 images (N, 3, S, S) at the model's input size and return the
image scores and blurred maps: rlr = Detector.score_images (backbone, both levels on the fastest
rlr_kernels backend, scoring, scipy blur); onnxruntime = the exported graph (``rlr export``) on
its CPU provider with its default threads. Decoding is outside the timing for both. Reports the
median images/s over ``repeats`` timed calls after one warm-up call, and the largest relative
difference of the scores. Methodology: docs/bench.md; figures: docs/usage.md.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rlr.atomic import atomic_write_json
from rlr.backbone import resize_image
from rlr.data import load_image
from rlr.export import export
from rlr.inference import collect_images, load

from .common import machine_name


def _timed(call, repeats: int) -> list:
    call()   # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start)
    return seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--images", required=True, help="folder of images (the first --batch are used)")
    p.add_argument("--onnx", help="an exported file of the run (default: export one to a temporary folder)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    import onnxruntime as ort

    detector = load(args.run, "cpu")
    size = detector.input_size
    paths = collect_images([args.images])[:args.batch]
    images = [resize_image(load_image(path), size) for path in paths]
    batch = np.stack(images).transpose(0, 3, 1, 2)
    with tempfile.TemporaryDirectory() as folder:
        onnx_file = args.onnx or export(args.run, Path(folder) / "model.onnx", log=lambda *_: None)
        session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    rlr_seconds = _timed(lambda: detector.score_images(images), args.repeats)
    ort_seconds = _timed(lambda: session.run(None, {"image": batch}), args.repeats)
    ours = detector.score_images(images)[0]
    theirs = session.run(None, {"image": batch})[0]
    result = {
        "machine": machine_name(torch.device("cpu")), "torch_threads": torch.get_num_threads(), "onnxruntime": ort.__version__,
        "run": str(args.run), "batch": len(images), "input_size": size, "repeats": args.repeats,
        "rlr_images_per_second": len(images) / statistics.median(rlr_seconds),
        "onnxruntime_images_per_second": len(images) / statistics.median(ort_seconds),
        "max_relative_score_difference": float(np.max(np.abs(theirs - ours) / np.abs(ours))),
    }
    width = max(len("onnxruntime (CPU)"), len("rlr (torch, rlr_kernels)"))
    print(f"{'method':<{width}}  images/s   (batch {len(images)}, {size} px, median of {args.repeats})")
    print(f"{'rlr (torch, rlr_kernels)':<{width}}  {result['rlr_images_per_second']:8.2f}")
    print(f"{'onnxruntime (CPU)':<{width}}  {result['onnxruntime_images_per_second']:8.2f}")
    print(f"max relative score difference: {result['max_relative_score_difference']:.2e}")
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
