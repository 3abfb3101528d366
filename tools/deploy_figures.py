"""The deployment figures of docs/usage.md and README: the stored threshold on the test sets, bf16/fp16
inference against fp32, and the exported ONNX file against rlr predict.

    python -m tools.deploy_figures --run RUN --data-root DIR [--onnx FILE] [--out FILE.json]

For every test image of each class of the run: the score of rlr's own inference (rlr.load, the
`rlr predict` path: decode, resize, backbone, levels, blur) in fp32 and in each reduced precision
this machine has, and of the ONNX file under onnxruntime. Reports per class and over all classes:
the false-positive rate on good images and the recall on defective ones at the run's global and
per-class thresholds, image AUROC per precision, and the largest relative differences of the ONNX
scores and maps to fp32.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from rlr.atomic import atomic_write_json
from rlr.backbone import resize_image
from rlr.data import load_dataset, load_image
from rlr.inference import bf16_is_native, fp16_is_native, load


def _rates(scores, labels, threshold) -> dict:
    flagged = scores >= threshold
    good, bad = labels == 0, labels == 1
    return {"fpr_good": float(flagged[good].mean()) if good.any() else None,
            "recall_defective": float(flagged[bad].mean()) if bad.any() else None}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--onnx", help="the run exported with `rlr export` (default: no ONNX figures)")
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    device = torch.device("cpu")
    precisions = ["fp32"] + [name for name, native in (("bf16", bf16_is_native), ("fp16", fp16_is_native))
                             if native(device)]
    detectors = {name: load(args.run, "cpu", name) for name in precisions}
    stored = detectors["fp32"].threshold
    session = None
    if args.onnx:
        import onnxruntime as ort

        session = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])
    splits = load_dataset(args.data_root, list(stored.classes))
    figures, everything = {"classes": {}}, {"labels": [], "scores": {}, "per_class_flags": []}
    worst_score = worst_map = 0.0
    for name, split in splits.items():
        labels = np.array([s.label for s in split.test])
        scores = {k: [] for k in precisions + (["onnx"] if session else [])}
        for start in range(0, len(split.test), 16):
            images = [load_image(s.path) for s in split.test[start:start + 16]]
            for precision, detector in detectors.items():
                batch_scores, maps = detector.score_images(images)
                scores[precision].extend(batch_scores.tolist())
                if precision == "fp32" and session is not None:
                    small = np.stack([resize_image(im, detector.input_size) for im in images])
                    onnx_scores, onnx_maps = session.run(None, {"image": small.transpose(0, 3, 1, 2)})
                    scores["onnx"].extend(onnx_scores.tolist())
                    worst_score = max(worst_score, float(np.max(np.abs(onnx_scores - batch_scores) / np.abs(batch_scores))))
                    worst_map = max(worst_map, float(np.max(np.abs(onnx_maps - maps) / np.abs(maps))))
        scores = {k: np.array(v) for k, v in scores.items()}
        cut = stored.cut(name)
        figures["classes"][name] = {
            "test_images": len(labels), "good": int((labels == 0).sum()), "defective": int((labels == 1).sum()),
            "threshold_global": {"value": stored.global_cut.threshold, **_rates(scores["fp32"], labels,
                                                                                 stored.global_cut.threshold)},
            "threshold_class": {"value": cut.threshold, "held_out_images": cut.images,
                                **_rates(scores["fp32"], labels, cut.threshold)},
            "image_auroc": {k: float(roc_auc_score(labels, v)) for k, v in scores.items()},
        }
        everything["labels"].extend(labels.tolist())
        everything["per_class_flags"].extend((scores["fp32"] >= cut.threshold).tolist())
        for k, v in scores.items():
            everything["scores"].setdefault(k, []).extend(v.tolist())
    labels = np.array(everything["labels"])
    flags = np.array(everything["per_class_flags"])
    figures["all"] = {
        "threshold_global": _rates(np.array(everything["scores"]["fp32"]), labels, stored.global_cut.threshold),
        "threshold_class": {"fpr_good": float(flags[labels == 0].mean()), "recall_defective": float(flags[labels == 1].mean())},
        "mean_image_auroc": {k: float(np.mean([c["image_auroc"][k] for c in figures["classes"].values()]))
                             for k in everything["scores"]},
    }
    if session is not None:
        figures["onnx"] = {"max_relative_score_difference": worst_score, "max_relative_map_difference": worst_map}
    figures["threshold"] = {"source": stored.source, "holdout": stored.holdout, "rule": stored.rule}
    print(json.dumps(figures, indent=2))
    if args.out:
        atomic_write_json(args.out, figures)
    return figures


if __name__ == "__main__":
    main()
