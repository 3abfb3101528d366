"""Evaluation of a trained run on each class's test split (DESIGN.md §4); scoring lives in rlr.inference.

Evaluation runs in fp32 whatever the training precision, so metrics do not depend on autocast,
unless ``precision`` asks for bf16/fp16 inference (to measure what it costs).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from .atomic import atomic_write_json
from .data import DatasetError, load_dataset, load_mask
from .features import FeatureCache
from .inference import Scorer, image_scores, open_run
from .metrics import METRIC_NAMES, ClassMetrics, mean_metrics
from .run import METRICS_FILE, REPORT_FILE

def _masks(samples, table, indices, size) -> np.ndarray:
    out = np.zeros((len(indices), size, size), dtype=bool)
    for row, i in enumerate(indices):
        if samples[i].mask_path is not None:
            out[row] = load_mask(samples[i].mask_path, size, image_shape=table.image_shape(i))
    return out


@dataclass
class ClassResult:
    name: str
    samples: list
    scores: np.ndarray
    metrics: dict
    table: object   # FeatureTable of the test images


def evaluate(run_dir, data_root=None, *, classes=None, layout: Optional[str] = None, cache_dir=None, device=None,
             backend: Optional[str] = None, batch_size: int = 16, report=None, progress: bool = True,
             log=print, precision: str = "fp32", runtime: str = "fast") -> dict:
    """Test a run on each class's test split; write ``RUN/metrics.json`` (and the report if asked).

    ``data_root``, ``classes`` and ``layout`` default to the run's training data. ``report``:
    None (no report), True (``RUN/report.html``) or a path. Returns the metrics dict.
    """
    started = time.perf_counter()
    run, extractor, device = open_run(run_dir, device, backend, runtime)   # the backbone fills the cache's misses
    data_meta = run.checkpoint.get("data", {})
    data_root = data_root or data_meta.get("root")
    if data_root is None:
        raise DatasetError("no data root: pass --data-root DIR (the run does not record one)")
    classes = classes if classes is not None else data_meta.get("classes")
    splits = load_dataset(data_root, classes, layout or data_meta.get("layout", "auto"))
    cache = FeatureCache(extractor, cache_dir, device=device, progress=progress)
    scorer = Scorer(run.model, extractor, device, precision, run.level_stats, run.config.scoring)
    size = extractor.input_size
    # A class may have training images only (an MVTec class without test/, a plain folder): it is skipped.
    skipped = {name: "no test images" for name, split in splits.items() if not split.test}
    if len(skipped) == len(splits):
        raise DatasetError(f"no test images in any class under {data_root} ({', '.join(splits)}): nothing to evaluate "
                           f"(test images go in CLASS/test/good and CLASS/test/DEFECT)")
    results = []
    for name, split in splits.items():
        samples = split.test
        if not samples:
            continue
        table = cache.features([s.path for s in samples], f"{name} test features")
        metrics = ClassMetrics(split.has_masks)
        scores = []
        for start in tqdm(range(0, len(samples), batch_size), desc=f"test {name}", disable=not progress, leave=False):
            indices = list(range(start, min(start + batch_size, len(samples))))
            maps = scorer.maps_from_tokens(table.tensors(indices, device))
            batch_scores = image_scores(maps)
            labels = np.array([samples[i].label for i in indices])
            if split.has_masks:
                metrics.update(labels, batch_scores, maps, _masks(samples, table, indices, size))
            else:
                metrics.update(labels, batch_scores)
            scores.append(batch_scores)
        results.append(ClassResult(name, samples, np.concatenate(scores), metrics.compute(), table))
    per_class = {r.name: r.metrics for r in results}
    output = {"classes": per_class, "mean": mean_metrics(per_class)}
    if skipped:
        output["skipped"] = skipped
    atomic_write_json(run.folder / METRICS_FILE, output)
    log(format_table(output))
    log(f"metrics written to {run.folder / METRICS_FILE} ({time.perf_counter() - started:.1f}s)")
    if report:
        path = Path(report) if not isinstance(report, bool) else run.folder / REPORT_FILE
        written = write_run_report(path, output, results, scorer, device, title=f"RLR anomaly report: {run.folder.name}")
        log(f"report written to {written}")
    return output


def write_run_report(path, metrics: dict, results: list, scorer: Scorer, device, title: str) -> Path:
    from .report import ClassOutcome, write_report

    def maps_for(table):
        def compute(indices):
            indices = list(indices)
            if not indices:
                return np.zeros((0, scorer.extractor.input_size, scorer.extractor.input_size), np.float32)
            return scorer.maps_from_tokens(table.tensors(indices, device))
        return compute

    outcomes = [ClassOutcome(r.name, r.samples, r.scores, maps_for(r.table)) for r in results]
    return Path(write_report(path, metrics, outcomes, title=title))


_SHORT = {"image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max", "pixel_auroc": "P-AUROC",
          "pixel_ap": "P-AP", "pixel_f1max": "P-F1max", "aupro": "AUPRO"}


def format_table(metrics: dict) -> str:
    """The metrics as a text table in percent; '-' where a metric is undefined (no masks); skipped classes last."""
    rows = list(metrics["classes"].items()) + [("mean", metrics["mean"])]
    skipped = metrics.get("skipped", {})
    width = max(len("class"), *(len(name) for name, _ in rows), *(len(name) for name in skipped))
    header = f"{'class':<{width}}  " + "  ".join(f"{_SHORT[m]:>7}" for m in METRIC_NAMES)
    lines = [header, "-" * len(header)]
    for name, values in rows:
        if name == "mean":
            lines.append("-" * len(header))
        cells = ["      -" if values.get(m) is None else f"{100 * values[m]:7.2f}" for m in METRIC_NAMES]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    lines += [f"{name:<{width}}  skipped: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines)
