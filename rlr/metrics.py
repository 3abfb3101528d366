"""Anomaly detection metrics of one class, accumulated batch by batch (DESIGN.md §4).

    m = ClassMetrics(has_masks=True)
    m.update(labels (B,), image_scores (B,), anomaly_maps (B, H, W), masks (B, H, W))   # per batch
    m.compute() -> {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"}
    mean_metrics({class: metrics}) -> the mean over classes, ignoring None

Definitions (y = 1 anomalous; a threshold t predicts "anomalous" where score >= t):
- AUROC: area under TPR(FPR); ties give a straight segment (same as scikit-learn).
- AP: sum_k (R_k - R_{k-1}) P_k over the distinct thresholds (scikit-learn's average_precision).
- F1max: max over those thresholds of 2PR / (P + R).
- AUPRO: ground-truth regions are the 8-connected components of each mask. PRO(t) is the mean
  over all regions (all images) of the fraction of the region's pixels with score >= t; FPR(t)
  is the fraction of normal pixels (mask 0, all images) with score >= t. Area under PRO(FPR)
  from FPR 0 to 0.3 (linear interpolation at 0.3), divided by 0.3.
A metric that is undefined (one label missing, no mask pixels) is None.

Memory: image scores are kept exactly (one float per image). Pixel scores are not kept at all:
each batch is added to three histograms over 2**20 ordered bins of the float32 score (anomalous
pixels, normal pixels, and anomalous pixels weighted 1 / region size for AUPRO), so memory is a
fixed 24 MiB per class whatever the test set size. The bin of a score is the top 20 bits of its
order-preserving float32 bit pattern (sign, exponent, 11 of 23 mantissa bits): two pixel scores
share a bin only if they have the same sign and exponent and differ by less than 2**-11 (~0.05 %)
relative, and binning never reorders scores. The pixel metrics are exactly those of the scores
rounded down to their bins, i.e. they treat such near-equal scores as ties. Measured effect on
maps from the synthetic set: see docs/data.md.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

METRIC_NAMES = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")
AUPRO_FPR_LIMIT = 0.3
SCORE_KEY_BITS = 20
_N_BINS = 1 << SCORE_KEY_BITS
# Regions of a mask batch (B, H, W): connected in-plane (8-neighbourhood), never across images.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


def to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors (any device, bfloat16 too) without importing torch."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def score_keys(scores: np.ndarray) -> np.ndarray:
    """Order-preserving bin index in [0, 2**20) of each score (float32 bit pattern, top 20 bits)."""
    values = np.asarray(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    bits = values.view(np.uint32)
    ordered = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
    return ordered >> np.uint32(32 - SCORE_KEY_BITS)


def _binary_counts(labels: np.ndarray, scores: np.ndarray):
    """True and false positives at each distinct score taken as threshold, highest first."""
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    positives = labels[order].astype(np.float64)
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    tps = np.cumsum(positives)[last_of_run]
    fps = (last_of_run + 1) - tps
    return tps, fps, sorted_scores[last_of_run]


def _auroc(tps: np.ndarray, fps: np.ndarray) -> float | None:
    if tps[-1] <= 0 or fps[-1] <= 0:
        return None
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def _precision_recall(tps: np.ndarray, fps: np.ndarray):
    precision = tps / np.maximum(tps + fps, 1e-300)
    recall = tps / tps[-1]
    return precision, recall


def _average_precision(tps: np.ndarray, fps: np.ndarray) -> float | None:
    if tps[-1] <= 0:
        return None
    precision, recall = _precision_recall(tps, fps)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(tps: np.ndarray, fps: np.ndarray) -> np.ndarray:
    precision, recall = _precision_recall(tps, fps)
    denominator = precision + recall
    return np.where(denominator > 0, 2 * precision * recall / np.where(denominator > 0, denominator, 1.0), 0.0)


def _f1max(tps: np.ndarray, fps: np.ndarray) -> float | None:
    if tps[-1] <= 0:
        return None
    return float(_f1(tps, fps).max())


def partial_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [x[0], x_max]; x non-decreasing; y interpolated at x_max."""
    k = int(np.searchsorted(x, x_max, side="right"))  # x[:k] <= x_max
    area = float(np.trapezoid(y[:k], x[:k])) if k > 1 else 0.0
    if 0 < k < len(x) and x[k - 1] < x_max:
        y_at = y[k - 1] + (y[k] - y[k - 1]) * (x_max - x[k - 1]) / (x[k] - x[k - 1])
        area += (x_max - x[k - 1]) * (y[k - 1] + y_at) / 2.0
    return area


def binary_curves(labels, scores) -> dict[str, np.ndarray]:
    """ROC and precision-recall points of image scores, thresholds highest first.

    Returns fpr, tpr (both starting at 0), precision, recall, f1 and thresholds (one per distinct
    score; fpr/tpr have one more leading point). Needs both labels present.
    """
    labels = to_numpy(labels).astype(np.int64).reshape(-1)
    scores = to_numpy(scores).astype(np.float64).reshape(-1)
    if len(labels) != len(scores) or len(labels) == 0:
        raise ValueError(f"binary_curves: labels {labels.shape} and scores {scores.shape} must be equal, non-empty")
    tps, fps, thresholds = _binary_counts(labels, scores)
    if tps[-1] <= 0 or fps[-1] <= 0:
        raise ValueError("binary_curves: needs both good (0) and anomalous (1) samples")
    precision, recall = _precision_recall(tps, fps)
    return {
        "fpr": np.r_[0.0, fps / fps[-1]], "tpr": np.r_[0.0, tps / tps[-1]],
        "precision": precision, "recall": recall, "f1": _f1(tps, fps), "thresholds": thresholds,
    }


def f1max_threshold(labels, scores) -> float:
    """The image-score threshold (score >= t is anomalous) reaching F1max; the lowest on ties."""
    curves = binary_curves(labels, scores)
    f1 = curves["f1"]
    return float(curves["thresholds"][np.flatnonzero(f1 == f1.max())[-1]])


class ClassMetrics:
    """Accumulates one class's test results batch by batch; memory is bounded (see module doc)."""

    def __init__(self, has_masks: bool):
        self.has_masks = bool(has_masks)
        self._labels: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._positive_hist: np.ndarray | None = None   # anomalous pixels per score bin
        self._normal_hist: np.ndarray | None = None     # normal pixels per score bin
        self._overlap_hist: np.ndarray | None = None    # anomalous pixels weighted 1 / region size
        self._regions = 0

    def update(self, labels, image_scores, anomaly_maps=None, masks=None) -> None:
        labels = to_numpy(labels)
        scores = to_numpy(image_scores)
        if labels.ndim != 1 or scores.shape != labels.shape:
            raise ValueError(f"ClassMetrics.update: labels and image_scores must both be (B,), "
                             f"got {labels.shape} and {scores.shape}")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"ClassMetrics.update: labels must be 0 (good) or 1 (anomalous), "
                             f"got {np.unique(labels)[:10]}")
        scores = scores.astype(np.float64)
        if np.isnan(scores).any():
            raise ValueError("ClassMetrics.update: image_scores contain NaN")
        if not self.has_masks:
            if anomaly_maps is not None or masks is not None:
                raise ValueError("ClassMetrics.update: this class has no masks (has_masks=False): "
                                 "pass no anomaly_maps or masks")
        else:
            if anomaly_maps is None or masks is None:
                raise ValueError("ClassMetrics.update: has_masks=True needs anomaly_maps (B, H, W) and masks (B, H, W)")
            self._add_pixels(labels, to_numpy(anomaly_maps), to_numpy(masks))
        self._labels.append(labels.astype(np.int64))
        self._scores.append(scores)

    def _add_pixels(self, labels: np.ndarray, maps: np.ndarray, masks: np.ndarray) -> None:
        if maps.ndim != 3 or maps.shape != masks.shape or maps.shape[0] != labels.shape[0]:
            raise ValueError(
                f"ClassMetrics.update: anomaly_maps and masks must both be (B, H, W) with B = {labels.shape[0]}, "
                f"got {maps.shape} and {masks.shape}"
            )
        if masks.dtype != bool:
            if not np.isin(masks, (0, 1)).all():
                raise ValueError("ClassMetrics.update: masks must be bool (or 0/1)")
            masks = masks.astype(bool)
        if masks[labels == 0].any():
            raise ValueError("ClassMetrics.update: a good image (label 0) has anomalous mask pixels")
        if np.isnan(maps).any():
            raise ValueError("ClassMetrics.update: anomaly_maps contain NaN")
        keys = score_keys(maps)
        if self._positive_hist is None:
            self._positive_hist = np.zeros(_N_BINS, dtype=np.int64)
            self._normal_hist = np.zeros(_N_BINS, dtype=np.int64)
            self._overlap_hist = np.zeros(_N_BINS, dtype=np.float64)
        self._normal_hist += np.bincount(keys[~masks], minlength=_N_BINS)
        if masks.any():
            regions, count = ndimage.label(masks, structure=_REGION_STRUCTURE)
            region_of_pixel = regions[masks]
            region_size = np.bincount(region_of_pixel)
            positive_keys = keys[masks]
            self._positive_hist += np.bincount(positive_keys, minlength=_N_BINS)
            weights = 1.0 / region_size[region_of_pixel]
            self._overlap_hist += np.bincount(positive_keys, weights=weights, minlength=_N_BINS)
            self._regions += count

    def compute(self) -> dict[str, float | None]:
        if not self._labels:
            raise ValueError("ClassMetrics.compute: no test samples were added (update was never called)")
        labels = np.concatenate(self._labels)
        scores = np.concatenate(self._scores)
        tps, fps, _ = _binary_counts(labels, scores)
        result: dict[str, float | None] = {
            "image_auroc": _auroc(tps, fps),
            "image_ap": _average_precision(tps, fps),
            "image_f1max": _f1max(tps, fps),
            "pixel_auroc": None, "pixel_ap": None, "pixel_f1max": None, "aupro": None,
        }
        if not self.has_masks or self._positive_hist is None:
            return result
        # Thresholds: the occupied bins, highest first.
        occupied = np.flatnonzero(self._positive_hist + self._normal_hist)[::-1]
        tps = np.cumsum(self._positive_hist[occupied]).astype(np.float64)
        fps = np.cumsum(self._normal_hist[occupied]).astype(np.float64)
        result["pixel_auroc"] = _auroc(tps, fps)
        result["pixel_ap"] = _average_precision(tps, fps)
        result["pixel_f1max"] = _f1max(tps, fps)
        if self._regions > 0 and fps[-1] > 0:
            fpr = np.r_[0.0, fps / fps[-1]]
            pro = np.r_[0.0, np.cumsum(self._overlap_hist[occupied]) / self._regions]
            result["aupro"] = float(partial_trapezoid(fpr, pro, AUPRO_FPR_LIMIT) / AUPRO_FPR_LIMIT)
        return result


def mean_metrics(per_class: dict[str, dict]) -> dict[str, float | None]:
    """Mean of each metric over classes, ignoring None; None where every class has None."""
    if not per_class:
        raise ValueError("mean_metrics: no classes given")
    mean: dict[str, float | None] = {}
    for name in METRIC_NAMES:
        values = [float(m[name]) for m in per_class.values() if m.get(name) is not None]
        mean[name] = float(np.mean(values)) if values else None
    return mean
