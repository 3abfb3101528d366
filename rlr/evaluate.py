"""Scoring and evaluation of a trained run (DESIGN.md §2, §4).

Per level, token score s_t = mean_c (f - f_hat)^2 + 1 - cos(f_t, f_hat_t); the h x w score grid is
upsampled bilinearly (align_corners=True) to the input size and the levels are averaged: that is
the anomaly map, on which the pixel metrics are computed. The image score is the maximum of the
map after a Gaussian blur with sigma 4 (scipy's gaussian_filter, as the original code).

Evaluation runs in fp32 whatever the training precision, so metrics do not depend on autocast.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from .atomic import atomic_write_json
from .backbone import FeatureExtractor, create_backbone
from .data import DatasetError, load_dataset, load_mask
from .features import FeatureCache
from .metrics import METRIC_NAMES, ClassMetrics, mean_metrics
from .model import RLRModel
from .run import METRICS_FILE, REPORT_FILE, RunError, load_run
from .train import resolve_device

BLUR_SIGMA = 4.0


def anomaly_maps(features: Sequence[torch.Tensor], reconstructions: Sequence[torch.Tensor], grids: Sequence[tuple],
                 size: int) -> torch.Tensor:
    """Per-pixel anomaly maps (B, size, size) float32 from each level's tokens and reconstruction."""
    total = None
    for f, r, (h, w) in zip(features, reconstructions, grids):
        f, r = f.float(), r.float()
        score = ((f - r) ** 2).mean(dim=-1) + 1 - F.cosine_similarity(f, r, dim=-1)   # (B, L)
        score = F.interpolate(score.view(-1, 1, h, w), size=(size, size), mode="bilinear", align_corners=True)
        total = score if total is None else total + score
    return (total / len(features)).squeeze(1)


def blur(maps: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Gaussian blur of each (S, S) map of (B, S, S)."""
    return np.stack([gaussian_filter(m, sigma=sigma) for m in maps]) if len(maps) else maps


def image_scores(maps: np.ndarray) -> np.ndarray:
    """Image score = max of the blurred map, (B, S, S) -> (B,)."""
    return blur(maps).reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0, np.float32)


class Scorer:
    """Anomaly maps of a trained model for images or cached tokens."""

    def __init__(self, model: RLRModel, extractor: FeatureExtractor, device):
        self.model, self.extractor, self.device = model.eval(), extractor, torch.device(device)

    @torch.no_grad()
    def maps_from_tokens(self, tokens: Sequence[torch.Tensor]) -> np.ndarray:
        tokens = [t.to(self.device, torch.float32) for t in tokens]
        return anomaly_maps(tokens, self.model(tokens), self.model.grids, self.extractor.input_size).cpu().numpy()

    @torch.no_grad()
    def maps_from_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (H, W, 3) images -> maps (B, S, S)."""
        batch = self.extractor.preprocess(images).to(self.device)
        # Same numbers as the cache path: tokens are rounded to float16 there too.
        return self.maps_from_tokens([t.half() for t in self.extractor(batch)])


def open_run(run_dir, device=None, backend: Optional[str] = None) -> tuple:
    """(TrainedRun, FeatureExtractor, device) for inference, checking the backbone weights."""
    device = resolve_device(device)
    run = load_run(run_dir, device, backend)
    config = run.config
    extractor = create_backbone(config.backbone, config.backbone_weights, config.out_indices,
                                config.input_size, config.avg_pool).to(device)
    expected = run.checkpoint.get("backbone_weights_sha256")
    if expected is not None and expected != extractor.weights_id:
        raise RunError(f"the backbone weights found now for {config.backbone} differ from those the run in "
                       f"{run_dir} was trained with (sha256 {expected[:12]}... vs {extractor.weights_id[:12]}...)")
    if [tuple(g) for g in extractor.grids] != run.model.grids or list(extractor.channels) != run.model.channels:
        raise RunError(f"backbone {config.backbone} gives levels {extractor.channels} channels on grids "
                       f"{extractor.grids}, the run's model expects {run.model.channels} on {run.model.grids}")
    return run, extractor, device


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
             log=print) -> dict:
    """Test a run on each class's test split; write ``RUN/metrics.json`` (and the report if asked).

    ``data_root``, ``classes`` and ``layout`` default to the run's training data. ``report``:
    None (no report), True (``RUN/report.html``) or a path. Returns the metrics dict.
    """
    started = time.perf_counter()
    run, extractor, device = open_run(run_dir, device, backend)
    data_meta = run.checkpoint.get("data", {})
    data_root = data_root or data_meta.get("root")
    if data_root is None:
        raise DatasetError("no data root: pass --data-root DIR (the run does not record one)")
    classes = classes if classes is not None else data_meta.get("classes")
    splits = load_dataset(data_root, classes, layout or data_meta.get("layout", "auto"))
    cache = FeatureCache(extractor, cache_dir, device=device, progress=progress)
    scorer = Scorer(run.model, extractor, device)
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
