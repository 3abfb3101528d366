"""MVTec AD layout (also MPDD, BTAD and any set laid out the same way, with any class names).

    ROOT/CLASS/train/good/*.png                  normal training images
    ROOT/CLASS/test/good/*.png                   normal test images (no masks)
    ROOT/CLASS/test/DEFECT/NAME.png              defective test images
    ROOT/CLASS/ground_truth/DEFECT/NAME_mask.png their masks (BTAD's NAME.png is accepted too)

BTAD names the normal folders ``ok``; they are read as ``good``. A class without a
``ground_truth`` folder has image labels only (``has_masks=False``). ROOT may also be a single
class folder (ROOT/train/good); the class is then named after ROOT.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .images import IMAGE_EXTENSIONS, DatasetError, list_images
from .types import ClassSplit, Sample

NORMAL_FOLDERS = ("good", "ok")

LAYOUT_HELP = (
    "MVTec AD layout: ROOT/CLASS/train/good/*.png, ROOT/CLASS/test/{good,DEFECT}/*.png and "
    "optionally ROOT/CLASS/ground_truth/DEFECT/NAME_mask.png"
)


def _normal_folder(parent: Path) -> Path | None:
    for name in NORMAL_FOLDERS:
        if (parent / name).is_dir():
            return parent / name
    return None


def is_class_folder(folder: Path) -> bool:
    return (folder / "train").is_dir() and _normal_folder(folder / "train") is not None


def find_classes(root: Path) -> dict[str, Path]:
    """Class name -> class folder; ROOT itself when it is a single class folder."""
    if is_class_folder(root):
        return {root.resolve().name: root}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and is_class_folder(p)}


def _mask_for(image: str, gt_folder: Path) -> str:
    stem = Path(image).stem
    suffix = Path(image).suffix
    candidates = [f"{base}{ext}" for base in (f"{stem}_mask", stem) for ext in (".png", suffix, *IMAGE_EXTENSIONS)]
    for name in dict.fromkeys(candidates):
        if (gt_folder / name).is_file():
            return str(gt_folder / name)
    raise DatasetError(
        f"missing mask for defective image {image}: expected {gt_folder / candidates[0]} "
        f"(the class has a ground_truth folder, so every defective test image needs a mask)"
    )


def load_class(name: str, folder: Path) -> ClassSplit:
    train_folder = _normal_folder(folder / "train")
    train_files = list_images(train_folder)
    if not train_files:
        raise DatasetError(
            f"no training images in {train_folder} (expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
        )
    gt_root = folder / "ground_truth"
    has_masks = gt_root.is_dir()
    split = ClassSplit(name=name, has_masks=has_masks)
    split.train = [Sample(path, name, 0, "good", None) for path in train_files]

    test_root = folder / "test"
    if not test_root.is_dir():
        return split  # train-only class: usable for training, nothing to evaluate
    for defect_folder in sorted(p for p in test_root.iterdir() if p.is_dir()):
        files = list_images(defect_folder)
        if defect_folder.name in NORMAL_FOLDERS:
            split.test += [Sample(path, name, 0, "good", None) for path in files]
            continue
        defect = defect_folder.name
        for path in files:
            mask = _mask_for(path, gt_root / defect) if has_masks else None
            split.test.append(Sample(path, name, 1, defect, mask))
    return split


def load_mvtec(root: str | os.PathLike, classes: Sequence[str] | None = None) -> dict[str, ClassSplit]:
    root = Path(root)
    found = find_classes(root)
    if not found:
        entries = sorted(p.name for p in root.iterdir())[:10]
        raise DatasetError(
            f"{root} is not in the {LAYOUT_HELP}: no CLASS/train/good folder found "
            f"(top-level entries: {entries or 'none'})"
        )
    names = list(found) if classes is None else list(classes)
    unknown = [c for c in names if c not in found]
    if unknown:
        raise DatasetError(f"unknown class(es) {unknown} in {root}; classes found: {sorted(found)}")
    return {name: load_class(name, found[name]) for name in names}
