"""Anomaly scores and heat-map overlays for new images with a trained run.

Writes, into the output folder:

    scores.csv            path, score (max of the blurred anomaly map; higher = more anomalous),
                          and, with a threshold, anomalous (1 where score >= threshold)
    overlays/<name>.png   the image (at the model's input size) beside the blurred anomaly map
                          blended over it (jet colour map)

A run stores no decision threshold: training sees normal images only, so a threshold needs
labelled examples of your own (e.g. the F1-optimal threshold on a validation set). Pass it with
``threshold``. The overlay colours span one range for all images of a call (the lowest and
highest map value among them, unless ``vmin``/``vmax`` are given), so colours compare across
the images of a call; fix ``vmin``/``vmax`` to compare across calls.
"""
from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .backbone import resize_image
from .data import DatasetError, is_image_file, load_image
from .evaluate import Scorer, blur, open_run

SCORES_FILE = "scores.csv"
OVERLAY_DIR = "overlays"


def collect_images(inputs: Sequence) -> list:
    """Image files from files and folders (a folder's images, sorted, not recursive)."""
    paths = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.is_file() and is_image_file(p))
            if not found:
                raise DatasetError(f"folder {item} holds no image files")
            paths.extend(found)
        elif item.is_file():
            paths.append(item)
        else:
            raise DatasetError(f"{item} does not exist (expected an image file or a folder of images)")
    return [str(p) for p in paths]


def overlay(image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """uint8 (S, 2S, 3): the image beside the heat map blended over it."""
    from matplotlib import colormaps

    norm = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colour = (colormaps["jet"](norm)[..., :3] * 255).astype(np.float32)
    blended = (alpha * colour + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)
    return np.concatenate([image, blended], axis=1)


def _unique_names(paths: Sequence[str]) -> list:
    names, used = [], set()
    for path in paths:
        stem = Path(path).stem
        name, k = stem, 2
        while name in used:
            name, k = f"{stem}_{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def predict(run_dir, inputs: Sequence, out, *, threshold: Optional[float] = None, vmin: Optional[float] = None,
            vmax: Optional[float] = None, device=None, backend: Optional[str] = None, batch_size: int = 16,
            overlays: bool = True, progress: bool = True, log=print) -> list:
    """Score images; write ``scores.csv`` and overlays into ``out``. Returns [(path, score), ...]."""
    paths = collect_images(inputs)
    if not paths:
        raise DatasetError("no input images given")
    run, extractor, device = open_run(run_dir, device, backend)
    scorer = Scorer(run.model, extractor, device)
    size = extractor.input_size
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = _unique_names(paths)
    folder = out / OVERLAY_DIR
    if overlays:
        folder.mkdir(exist_ok=True)
    # Maps wait on disk (float16) until the colour range of the whole call is known.
    fixed_range = vmin is not None and vmax is not None
    spill = None if fixed_range or not overlays else tempfile.TemporaryFile(dir=out)
    heat_maps = (np.memmap(spill, dtype=np.float16, mode="w+", shape=(len(paths), size, size))
                 if spill is not None else None)
    scores, low, high = [], np.inf, -np.inf
    try:
        for start in tqdm(range(0, len(paths), batch_size), desc="predict", disable=not progress, leave=False):
            batch = [resize_image(load_image(p), size) for p in paths[start:start + batch_size]]
            blurred = blur(scorer.maps_from_images(batch))
            scores.extend(float(m.max()) for m in blurred)
            low, high = min(low, float(blurred.min())), max(high, float(blurred.max()))
            if fixed_range and overlays:
                for name, image, heat in zip(names[start:], batch, blurred):
                    Image.fromarray(overlay(image, heat, vmin, vmax)).save(folder / f"{name}.png")
            elif heat_maps is not None:
                heat_maps[start:start + len(batch)] = blurred
        if heat_maps is not None:
            low = low if vmin is None else vmin
            high = high if vmax is None else vmax
            for i, (path, name) in enumerate(zip(paths, names)):
                image = resize_image(load_image(path), size)
                Image.fromarray(overlay(image, heat_maps[i].astype(np.float32), low, high)).save(folder / f"{name}.png")
    finally:
        if spill is not None:
            del heat_maps
            spill.close()
    with open(out / SCORES_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "score"] + (["anomalous"] if threshold is not None else []))
        for path, score in zip(paths, scores):
            writer.writerow([path, f"{score:.6g}"] + ([int(score >= threshold)] if threshold is not None else []))
    log(f"scored {len(paths)} images: {out / SCORES_FILE}" + (f", overlays in {out / OVERLAY_DIR}" if overlays else ""))
    return list(zip(paths, scores))
