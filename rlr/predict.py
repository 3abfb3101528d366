"""``rlr predict``: anomaly scores, labels and heat-map overlays for new images with a trained run.

Writes, into the output folder:

    scores.csv            path, score (max of the blurred anomaly map; higher = more anomalous),
                          label (1 anomalous, 0 normal: score >= threshold), normalized_score (0.5 at the
                          threshold), error (why an image could not be scored; its other cells empty).
                          Written row by row and flushed: a killed job keeps what it scored.
    overlays/<name>.png   the image (at the model's input size) beside the blurred anomaly map
                          blended over it (jet colour map)
    maps/<name>.npy       with save_maps="npy": the blurred anomaly map at the image's own size, float32
    maps/<name>.png       with save_maps="png": the same map as a 16-bit PNG of the normalised map
                          (value / 65535 = normalised score of the pixel; 0.5 = the threshold)
    masks/<name>.png      with save_maps and a threshold: pixels with map >= threshold (255), 8-bit

A folder is read with its subfolders: an image's ``path`` is its path relative to the folder given
(``crack/000.png``), and ``<name>`` mirrors that tree (``overlays/crack/000.png``), so images of the
same file name in different subfolders stay apart. An image file given by itself keeps its path as
given, and ``<name>`` is its file name. (Two inputs that give the same relative path: the later one
keeps its full path, and its outputs get a ``_2`` suffix.) A reused output folder is cleared of the
earlier call's overlays, maps and masks first, so what it holds is this call's alone.

The threshold is the run's own (RUN/threshold.json, chosen at the end of training, rlr.threshold),
per class with ``class_name``, else global; ``threshold`` overrides it. A run trained before rlr
stored thresholds has none: labels stay empty unless ``threshold`` is given. The overlay colours
span one range for all images of a call (the lowest and highest map value among them, unless
``vmin``/``vmax`` are given); fix ``vmin``/``vmax`` to compare across calls. The maps at the
image's size keep the score as their maximum (rlr.inference.resize_map), so a mask is empty exactly
when the label is 0.

Each image file is decoded once; an unreadable one (or one of a format other than PNG, JPEG, BMP
or TIFF) gets its error in scores.csv and the others go on (the command's exit status then says
some failed).
"""
from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .atomic import atomic_save
from .backbone import resize_image
from .data import DatasetError, load_image
from .inference import Detector, collect_images, load, resize_map

SCORES_FILE = "scores.csv"
OVERLAY_DIR = "overlays"
MAPS_DIR = "maps"
MASKS_DIR = "masks"
COLUMNS = ("path", "score", "label", "normalized_score", "error")
MAP_FORMATS = ("npy", "png")

__all__ = ["COLUMNS", "PredictedImage", "collect_images", "overlay", "predict"]


@dataclass
class PredictedImage:
    """One row of scores.csv: the score, label and normalised score, or the error that stopped the image."""

    path: str
    score: Optional[float] = None
    label: Optional[int] = None
    normalized_score: Optional[float] = None
    error: Optional[str] = None

    def row(self) -> list:
        return [self.path, "" if self.score is None else f"{self.score:.6g}", "" if self.label is None else self.label,
                "" if self.normalized_score is None else f"{self.normalized_score:.6g}", self.error or ""]


def overlay(image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """uint8 (S, 2S, 3): the image beside the heat map blended over it."""
    from matplotlib import colormaps

    norm = np.clip((heat - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colour = (colormaps["jet"](norm)[..., :3] * 255).astype(np.float32)
    blended = (alpha * colour + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)
    return np.concatenate([image, blended], axis=1)


def _named_inputs(inputs: Sequence, skip: Sequence) -> list:
    """(path, path shown in scores.csv, output name without suffix) of every input image, in order."""
    items, shown, used = [], set(), set()
    for item in inputs:
        from_folder = Path(item).is_dir()
        for path, relative in collect_images([item], skip, relative=True):
            # output names stay inside the output folder: a path relative to the folder given, or a file name
            stem = str(Path(relative).with_suffix("")) if from_folder else Path(path).stem
            if relative in shown:      # the same relative path from another input: its full path keeps it apart
                relative = path
            shown.add(relative)
            name, k = stem, 2
            while name in used:
                name, k = f"{stem}_{k}", k + 1
            used.add(name)
            items.append((path, relative, name))
    return items


def _clear_earlier_outputs(out: Path) -> None:
    """Remove the images and maps an earlier call left in ``out``'s overlays/, maps/ and masks/ (what this module
    writes there; any other file stays, and so do the folders that hold one)."""
    for folder in (out / OVERLAY_DIR, out / MAPS_DIR, out / MASKS_DIR):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_file() and not path.is_symlink() and path.suffix in (".png", ".npy"):
                path.unlink()
            elif path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()


def _save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


class _MapWriter:
    """maps/ and masks/ of ``save_maps`` for one call."""

    def __init__(self, out: Path, kind: str, detector: Detector, class_name: Optional[str]):
        if kind not in MAP_FORMATS:
            raise ValueError(f"save_maps must be one of {MAP_FORMATS}, got {kind!r}")
        self.kind, self.cut = kind, detector.cut(class_name)
        if kind == "png" and self.cut is None:
            raise ValueError("save_maps='png' stores the normalised map, which needs a threshold: the run has none; "
                             "pass --threshold, or use --save-maps npy")
        self.maps = out / MAPS_DIR
        self.maps.mkdir(exist_ok=True)
        self.masks = out / MASKS_DIR
        if self.cut is not None:
            self.masks.mkdir(exist_ok=True)

    def write(self, name: str, heat: np.ndarray) -> None:
        if self.kind == "npy":
            (self.maps / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_save(self.maps / f"{name}.npy", lambda f: np.save(f, heat.astype(np.float32)))
        else:
            _save_png(self.maps / f"{name}.png", np.round(self.cut.normalize(heat) * 65535).astype(np.uint16))
        if self.cut is not None:
            # compared in float64, as the label compares the score: the mask is empty exactly when the label is 0
            flagged = heat.astype(np.float64) >= self.cut.threshold
            _save_png(self.masks / f"{name}.png", np.where(flagged, 255, 0).astype(np.uint8))


def predict(run_dir, inputs: Sequence, out, *, threshold: Optional[float] = None, class_name: Optional[str] = None,
            vmin: Optional[float] = None, vmax: Optional[float] = None, device=None, backend: Optional[str] = None,
            precision: str = "fp32", batch_size: int = 16, overlays: bool = True, save_maps: Optional[str] = None,
            progress: bool = True, log=print) -> list:
    """Score images; write ``scores.csv`` (and overlays, maps, masks) into ``out``.

    Returns one :class:`PredictedImage` per input image, in order; those that failed carry ``error``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive number of images, got {batch_size!r}")
    out = Path(out)
    items = _named_inputs(inputs, [out / OVERLAY_DIR, out / MAPS_DIR, out / MASKS_DIR])
    if not items:
        raise DatasetError("no input images given")
    paths = [path for path, _, _ in items]
    shown = [relative for _, relative, _ in items]
    names = [name for _, _, name in items]
    detector = load(run_dir, device, precision, threshold=threshold, backend=backend, batch_size=batch_size)
    cut = detector.cut(class_name)
    if cut is None:
        log(f"the run in {run_dir} stores no threshold (trained before rlr stored one): the label column stays "
            f"empty; pass --threshold to label images")
    else:
        log(f"threshold {cut.threshold:.6g} ({'given' if threshold is not None else 'the run' + chr(39) + 's'}"
            f"{', class ' + class_name if class_name and threshold is None else ', global' if threshold is None else ''})")
    size = detector.input_size
    out.mkdir(parents=True, exist_ok=True)
    maps_writer = _MapWriter(out, save_maps, detector, class_name) if save_maps else None
    _clear_earlier_outputs(out)
    folder = out / OVERLAY_DIR
    if overlays:
        folder.mkdir(exist_ok=True)
    # Without a fixed colour range the overlays wait until the whole call's range is known: the
    # resized images and blurred maps wait on disk, so no image is decoded twice.
    fixed_range = vmin is not None and vmax is not None
    spill_dir = tempfile.TemporaryDirectory(dir=out) if overlays and not fixed_range else None
    if spill_dir is not None:
        waiting_images = np.lib.format.open_memmap(os.path.join(spill_dir.name, "images.npy"), mode="w+",
                                                   dtype=np.uint8, shape=(len(paths), size, size, 3))
        waiting_maps = np.lib.format.open_memmap(os.path.join(spill_dir.name, "maps.npy"), mode="w+",
                                                 dtype=np.float16, shape=(len(paths), size, size))
    results, scored, low, high = [], [], np.inf, -np.inf
    try:
        with open(out / SCORES_FILE, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(COLUMNS)
            handle.flush()
            bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
            for start in range(0, len(paths), batch_size):
                batch, rows = [], []
                for index in range(start, min(start + batch_size, len(paths))):
                    try:
                        batch.append((index, load_image(paths[index])))
                    except DatasetError as err:
                        rows.append((index, PredictedImage(shown[index], error=str(err))))
                if batch:
                    small_images = [resize_image(image, size) for _, image in batch]
                    scores, maps = detector.score_images(small_images)
                    low, high = min(low, float(maps.min())), max(high, float(maps.max()))
                    for (index, image), small, score, heat in zip(batch, small_images, scores, maps):
                        result = detector.result(score, heat, cut, paths[index])
                        rows.append((index, PredictedImage(shown[index], result.score, result.label,
                                                           result.normalized_score)))
                        if maps_writer is not None:
                            maps_writer.write(names[index], resize_map(heat, image.shape[:2]))
                        if overlays:
                            if fixed_range:
                                _save_png(folder / f"{names[index]}.png", overlay(small, heat, vmin, vmax))
                            else:
                                waiting_images[index], waiting_maps[index] = small, heat
                                scored.append(index)
                for _, row in sorted(rows, key=lambda r: r[0]):
                    writer.writerow(row.row())
                    results.append(row)
                handle.flush()
                os.fsync(handle.fileno())
                bar.update(len(rows))
            bar.close()
        if spill_dir is not None:
            low = low if vmin is None else vmin
            high = high if vmax is None else vmax
            for index in scored:
                _save_png(folder / f"{names[index]}.png",
                          overlay(np.asarray(waiting_images[index]), waiting_maps[index].astype(np.float32), low, high))
    finally:
        if spill_dir is not None:
            del waiting_images, waiting_maps
            spill_dir.cleanup()
    failed = [r for r in results if r.error]
    flagged = sum(1 for r in results if r.label == 1)
    log(f"scored {len(results) - len(failed)} of {len(paths)} images"
        + (f" ({flagged} anomalous)" if cut is not None else "") + f": {out / SCORES_FILE}"
        + (f", overlays in {folder}" if overlays else "")
        + (f", maps in {out / MAPS_DIR}" if save_maps else ""))
    for row in failed:
        log(f"failed: {row.path}: {row.error}")
    return results

