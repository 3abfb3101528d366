"""A plain folder of normal images: one class named after the folder, training images only."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .images import IMAGE_EXTENSIONS, DatasetError, list_images
from .types import ClassSplit, Sample


def load_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> dict[str, ClassSplit]:
    root = Path(root)
    name = root.resolve().name
    files = list_images(root)
    if not files:
        raise DatasetError(
            f"no images directly inside {root} (folder layout: a folder of normal images ending in "
            f"{', '.join(IMAGE_EXTENSIONS)})"
        )
    unknown = [c for c in (classes or []) if c != name]
    if unknown:
        raise DatasetError(f"unknown class(es) {unknown} in {root}; classes found: [{name!r}]")
    return {name: ClassSplit(name=name, train=[Sample(p, name, 0, "good", None) for p in files])}
