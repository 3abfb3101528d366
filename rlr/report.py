"""A self-contained HTML report of a test run (issue 5).

    write_report(path, metrics, outcomes, title="RLR anomaly report") -> Path

One HTML file, every image embedded as a base64 PNG (no side files): the metrics table of every
class and their mean, image-level ROC and precision-recall curves of all classes, and per class
a score histogram and a grid of examples (most anomalous, missed defects and false alarms at the
F1max threshold, least anomalous), each shown as the image with its heat map (ground truth
outlined) next to the ground-truth mask. Plots use matplotlib's Agg canvas directly (no pyplot,
no global backend switch).
"""
from __future__ import annotations

import base64
import dataclasses
import html
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .atomic import atomic_write_text
from .data import Sample, load_image, load_mask
from .metrics import METRIC_NAMES, binary_curves, f1max_threshold, mean_metrics, to_numpy

EXAMPLES_PER_ROW = 4
TILE_PX = 176          # examples are shown at most this large (maps larger than this are downscaled)
HEAT_COLORMAP = "jet"

_METRIC_TITLES = {
    "image_auroc": "Image AUROC", "image_ap": "Image AP", "image_f1max": "Image F1max",
    "pixel_auroc": "Pixel AUROC", "pixel_ap": "Pixel AP", "pixel_f1max": "Pixel F1max", "aupro": "AUPRO",
}


@dataclass
class ClassOutcome:
    name: str
    samples: list[Sample]                 # the class's test samples, in order
    scores: np.ndarray                    # (N,) image scores
    anomaly_maps: Callable[[Sequence[int]], np.ndarray]   # maps (n,S,S) float32 for chosen test indices


# ----------------------------------------------------------------------------- images

def _png_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_uri(figure) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _colormap(name: str):
    from matplotlib import colormaps

    return colormaps[name]


def _resize(array: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    if array.shape[0] == size and array.shape[1] == size:
        return array
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((size, size), resample))


def _overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None, lo: float, hi: float) -> np.ndarray:
    """Image with the heat map blended in (more opaque where hotter) and the mask outlined white."""
    norm = np.clip((heat - lo) / max(hi - lo, 1e-12), 0, 1)
    colors = _colormap(HEAT_COLORMAP)(norm)[..., :3]
    alpha = (0.7 * norm)[..., None]  # cool (normal) areas stay see-through
    blended = (1 - alpha) * image.astype(np.float32) / 255 + alpha * colors
    out = np.clip(blended * 255 + 0.5, 0, 255).astype(np.uint8)
    if mask is not None and mask.any():
        from scipy import ndimage

        out[mask & ~ndimage.binary_erosion(mask)] = (255, 255, 255)
    return out


def _colorbar(width: int = 160, height: int = 10) -> str:
    ramp = np.linspace(0, 1, width)[None, :].repeat(height, axis=0)
    return _png_uri((_colormap(HEAT_COLORMAP)(ramp)[..., :3] * 255).astype(np.uint8))


# ----------------------------------------------------------------------------- plots

def _curves_figure(outcomes: list[ClassOutcome]) -> str | None:
    from matplotlib.figure import Figure

    drawable = [o for o in outcomes if len(set(_labels(o).tolist())) == 2]
    if not drawable:
        return None
    figure = Figure(figsize=(10, 4.2), dpi=100)
    figure.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.92, wspace=0.2)
    roc, pr = figure.subplots(1, 2)
    for outcome in drawable:
        curves = binary_curves(_labels(outcome), outcome.scores)
        auroc = float(np.trapezoid(curves["tpr"], curves["fpr"]))
        roc.plot(curves["fpr"], curves["tpr"], lw=1.5, label=f"{outcome.name} ({100 * auroc:.1f})")
        recall = np.r_[0.0, curves["recall"]]
        precision = np.r_[curves["precision"][0], curves["precision"]]
        pr.step(recall, precision, where="pre", lw=1.5, label=outcome.name)
    roc.plot([0, 1], [0, 1], color="0.7", lw=1, ls="--")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (image level, AUROC %)",
            xlim=(0, 1), ylim=(0, 1.02))
    pr.set(xlabel="recall", ylabel="precision", title="Precision-recall (image level)", xlim=(0, 1), ylim=(0, 1.02))
    for axes in (roc, pr):
        axes.grid(alpha=0.3)
    roc.legend(fontsize=8, loc="lower right")
    pr.legend(fontsize=8, loc="lower left")
    return _figure_uri(figure)


def _histogram_figure(outcome: ClassOutcome, threshold: float | None) -> str:
    from matplotlib.figure import Figure

    labels = _labels(outcome)
    figure = Figure(figsize=(5.2, 2.4), dpi=100)
    figure.subplots_adjust(left=0.11, right=0.98, bottom=0.2, top=0.88)
    axes = figure.subplots()
    bins = np.histogram_bin_edges(outcome.scores, bins=min(30, max(5, len(outcome.scores) // 3)))
    for value, name, color in ((0, "good", "tab:green"), (1, "anomalous", "tab:red")):
        if (labels == value).any():
            axes.hist(outcome.scores[labels == value], bins=bins, alpha=0.6, color=color, label=name)
    if threshold is not None:
        axes.axvline(threshold, color="k", ls="--", lw=1, label="F1max threshold")
    axes.set(xlabel="image score", ylabel="images", title=f"{outcome.name}: image scores")
    axes.legend(fontsize=8)
    return _figure_uri(figure)


# ----------------------------------------------------------------------------- sections

def _labels(outcome: ClassOutcome) -> np.ndarray:
    return np.array([s.label for s in outcome.samples], dtype=np.int64)


def _fmt(value) -> str:
    return "&ndash;" if value is None else f"{100 * float(value):.1f}"


def _metrics_table(per_class: dict[str, dict], mean: dict) -> str:
    head = "".join(f"<th>{_METRIC_TITLES[m]}</th>" for m in METRIC_NAMES)
    rows = []
    for name, values in per_class.items():
        cells = "".join(f"<td>{_fmt(values.get(m))}</td>" for m in METRIC_NAMES)
        link = f"<a href='#class-{html.escape(name)}'>{html.escape(name)}</a>"
        rows.append(f"<tr><th class='name'>{link}</th>{cells}</tr>")
    cells = "".join(f"<td>{_fmt(mean.get(m))}</td>" for m in METRIC_NAMES)
    rows.append(f"<tr class='mean'><th class='name'>mean</th>{cells}</tr>")
    return f"<table class='metrics'><tr><th>class</th>{head}</tr>{''.join(rows)}</table>"


def _select_examples(outcome: ClassOutcome, threshold: float | None) -> list[tuple[str, list[int]]]:
    labels = _labels(outcome)
    scores = outcome.scores
    order = np.argsort(-scores, kind="stable")
    k = EXAMPLES_PER_ROW
    rows = [("Most anomalous", order[:k].tolist())]
    if threshold is not None:
        false_negatives = [i for i in order[::-1] if labels[i] == 1 and scores[i] < threshold]
        false_positives = [i for i in order if labels[i] == 0 and scores[i] >= threshold]
        rows.append(("Missed defects (false negatives, lowest scores first)", false_negatives[:k]))
        rows.append(("False alarms (false positives, highest scores first)", false_positives[:k]))
    rows.append(("Least anomalous", order[::-1][:k].tolist()))
    return rows


def _example_card(outcome: ClassOutcome, index: int, heat: np.ndarray, lo: float, hi: float, has_masks: bool) -> str:
    sample = outcome.samples[index]
    size = heat.shape[0]
    image = _resize(load_image(sample.path), size)
    mask = load_mask(sample.mask_path, size) if sample.mask_path else np.zeros((size, size), dtype=bool)
    tile = min(size, TILE_PX)
    overlay = _resize(_overlay(image, heat, mask, lo, hi), tile)
    tiles = [overlay]
    if has_masks:
        tiles.append(_resize(mask.astype(np.uint8) * 255, tile, nearest=True)[..., None].repeat(3, axis=-1))
    gap = np.full((tile, 4, 3), 255, dtype=np.uint8)
    strip = np.concatenate([tiles[0]] + ([gap, tiles[1]] if len(tiles) > 1 else []), axis=1)
    kind = "good" if sample.label == 0 else html.escape(sample.defect)
    name = html.escape(os.path.basename(sample.path))
    alt = f"{outcome.name} {kind} {name}: heat map" + (" and ground truth" if has_masks else "")
    return (f"<figure class='example'><img src='{_png_uri(strip)}' alt='{html.escape(alt)}'>"
            f"<figcaption><b class='{'bad' if sample.label else 'ok'}'>{kind}</b> {name}<br>"
            f"score {float(outcome.scores[index]):.4g}</figcaption></figure>")


def _class_section(outcome: ClassOutcome, has_masks: bool) -> str:
    labels = _labels(outcome)
    scores = outcome.scores
    name = html.escape(outcome.name)
    both = len(set(labels.tolist())) == 2
    threshold = f1max_threshold(labels, scores) if both else None
    parts = [f"<section id='class-{name}'><h2>{name}</h2>"]
    summary = f"{int((labels == 0).sum())} good and {int((labels == 1).sum())} anomalous test images"
    if threshold is not None:
        predicted = scores >= threshold
        tp, fp = int((predicted & (labels == 1)).sum()), int((predicted & (labels == 0)).sum())
        fn, tn = int((~predicted & (labels == 1)).sum()), int((~predicted & (labels == 0)).sum())
        summary += (f"; at the F1max threshold {threshold:.4g} (score &ge; threshold = anomalous): "
                    f"{tp} detected, {fn} missed, {fp} false alarms, {tn} correct rejections")
    else:
        summary += "; both good and anomalous images are needed for curves and a threshold"
    if not has_masks:
        summary += ". No ground-truth masks: pixel metrics are not available"
    parts.append(f"<p>{summary}.</p>")
    parts.append(f"<img class='plot' src='{_histogram_figure(outcome, threshold)}' alt='{name} image score histogram'>")

    rows = [(title, idx) for title, idx in _select_examples(outcome, threshold)]
    wanted = sorted({i for _, idx in rows for i in idx})
    if wanted:
        maps = to_numpy(outcome.anomaly_maps(wanted)).astype(np.float32)
        if maps.ndim != 3 or maps.shape[0] != len(wanted) or maps.shape[1] != maps.shape[2]:
            raise ValueError(f"write_report: anomaly_maps({len(wanted)} indices) of class {outcome.name!r} must "
                             f"return (n, S, S) maps, got {maps.shape}")
        heat = dict(zip(wanted, maps))
        lo, hi = float(np.median(maps)), float(maps.max())
        parts.append(f"<p class='scale'>Heat-map colour scale (shared by this class): {lo:.4g} "
                     f"<img src='{_colorbar()}' alt='colour bar'> {hi:.4g}"
                     + (" &nbsp; ground truth outlined in white, mask shown on the right" if has_masks else "")
                     + "</p>")
        for title, idx in rows:
            if not idx:
                parts.append(f"<h3>{html.escape(title)}</h3><p class='none'>none</p>")
                continue
            cards = "".join(_example_card(outcome, i, heat[i], lo, hi, has_masks) for i in idx)
            parts.append(f"<h3>{html.escape(title)}</h3><div class='grid'>{cards}</div>")
    parts.append("</section>")
    return "".join(parts)


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; padding: 0 16px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
h3 { font-size: 15px; margin: 16px 0 6px; color: #444; }
table.metrics { border-collapse: collapse; font-size: 14px; margin: 12px 0; }
table.metrics th, table.metrics td { padding: 5px 10px; border-bottom: 1px solid #e4e4e4; text-align: right; }
table.metrics th.name, table.metrics tr:first-child th:first-child { text-align: left; }
table.metrics tr:first-child th { background: #f3f3f3; }
table.metrics tr.mean { font-weight: bold; background: #fafafa; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure.example { margin: 0; font-size: 12px; }
figure.example img { display: block; border: 1px solid #ccc; }
figcaption { margin-top: 3px; line-height: 1.35; word-break: break-all; max-width: 360px; }
b.bad { color: #c0392b; } b.ok { color: #1e8449; }
img.plot { max-width: 100%; } p.scale img { vertical-align: middle; } p.none { color: #888; margin: 0; }
.note { color: #666; font-size: 13px; }
"""


def write_report(path: str | os.PathLike, metrics: dict, outcomes: list[ClassOutcome],
                 title: str = "RLR anomaly report") -> Path:
    """Write the report to ``path`` (an .html file; parent folders are created) and return it.

    ``metrics``: as in metrics.json, ``{"classes": {name: {...}}, "mean": {...}}`` (a plain
    ``{name: {...}}`` also works; the mean is then computed). ``outcomes``: one per class.
    """
    path = Path(path)
    per_class = metrics.get("classes", metrics) if isinstance(metrics, dict) else None
    if not isinstance(per_class, dict) or not all(isinstance(v, dict) for v in per_class.values()):
        raise ValueError("write_report: metrics must be {'classes': {name: {metric: value}}, 'mean': {...}}")
    mean = metrics.get("mean") or (mean_metrics(per_class) if per_class else {})
    checked = []
    for outcome in outcomes:
        scores = to_numpy(outcome.scores).astype(np.float64)
        if scores.shape != (len(outcome.samples),):
            raise ValueError(f"write_report: class {outcome.name!r} has {len(outcome.samples)} samples but scores "
                             f"of shape {scores.shape}")
        checked.append(dataclasses.replace(outcome, scores=scores))
    outcomes = checked
    n_images = sum(len(o.samples) for o in outcomes)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{len(outcomes)} classes, {n_images} test images. Metrics in percent; "
        "&ndash; = not available (class without ground-truth masks, or a label missing from its test set). "
        "AUPRO: per-region overlap integrated up to a false positive rate of 0.3, normalised.</p>",
        "<h2>Metrics</h2>", _metrics_table(per_class, mean),
    ]
    curves = _curves_figure(outcomes)
    if curves is not None:
        parts += ["<h2>Image-level curves</h2>",
                  f"<img class='plot' src='{curves}' alt='ROC and precision-recall curves'>"]
    for outcome in outcomes:
        has_masks = any(s.mask_path for s in outcome.samples)
        parts.append(_class_section(outcome, has_masks))
    parts.append("</body></html>")
    return atomic_write_text(path, "\n".join(parts))
