"""Data sets for unified multi-class anomaly detection (DESIGN.md §4).

    load_dataset(root, classes=None, layout="auto") -> {class name: ClassSplit}
    load_image(path) -> uint8 (H, W, 3)        load_mask(path, size, image_shape=None) -> bool (size, size)

Layouts: MVTec AD (also MPDD/BTAD-style sets), VisA (split_csv/1cls.csv), a plain folder of
normal images. ``rlr.data.synthetic.generate_dataset`` writes a small MVTec-layout set.
No torch here: the data layer is plain numpy + PIL.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .folder import load_folder
from .images import (IMAGE_EXTENSIONS, IMAGE_FORMATS, DatasetError, ImageFileError, ImageInfo, find_images,
                     image_info, is_image_file, list_images, load_image, load_mask)
from .mvtec import LAYOUT_HELP as MVTEC_LAYOUT_HELP
from .mvtec import find_classes as find_mvtec_classes
from .mvtec import load_mvtec
from .types import ClassSplit, Sample
from .visa import SPLIT_FILE as VISA_SPLIT_FILE
from .visa import load_visa

LAYOUTS = ("auto", "mvtec", "visa", "folder")
_READERS = {"mvtec": load_mvtec, "visa": load_visa, "folder": load_folder}

__all__ = [
    "IMAGE_EXTENSIONS", "IMAGE_FORMATS", "LAYOUTS", "ClassSplit", "DatasetError", "ImageFileError", "ImageInfo",
    "Sample", "detect_layout", "find_images", "image_info", "is_image_file", "list_images", "load_dataset",
    "load_image", "load_mask",
]


def detect_layout(root: str | os.PathLike) -> str:
    """"visa" if ROOT/split_csv/1cls.csv exists, "mvtec" if ROOT/CLASS/train/good (or ROOT/train/good)
    exists, "folder" if ROOT holds image files; otherwise a DatasetError describing the three."""
    root = Path(root)
    if (root / VISA_SPLIT_FILE).is_file():
        return "visa"
    if find_mvtec_classes(root):
        return "mvtec"
    if any(p.is_file() and is_image_file(p) for p in root.iterdir()):
        return "folder"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(entries[:10]) + (", ..." if len(entries) > 10 else "") if entries else "it is empty"
    raise DatasetError(
        f"cannot recognise the data set layout of {root} (found: {shown}). Expected one of: "
        f"{MVTEC_LAYOUT_HELP}; VisA layout: ROOT/{VISA_SPLIT_FILE.as_posix()}; "
        f"folder layout: ROOT/*.png (normal images only)"
    )


def load_dataset(
    root: str | os.PathLike, classes: Sequence[str] | str | None = None, layout: str = "auto"
) -> dict[str, ClassSplit]:
    """Read a data set's file lists (images are decoded later, by load_image).

    ``classes``: names to keep, in this order (a "a,b" string is split on commas); None: all, sorted.
    """
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} is not a folder")
    if isinstance(classes, str):
        classes = [c.strip() for c in classes.split(",") if c.strip()]
    if classes is not None:
        classes = list(classes)
        if not classes:
            raise DatasetError(f"no class selected in {root} (classes is empty); pass None for all classes")
        duplicated = sorted({c for c in classes if classes.count(c) > 1})
        if duplicated:
            raise DatasetError(f"class(es) {duplicated} selected more than once")
    chosen = detect_layout(root) if layout == "auto" else layout
    return _READERS[chosen](root, classes)
