"""VisA layout: the split file ROOT/split_csv/1cls.csv lists every image.

    object,split,label,image,mask
    candle,train,normal,candle/Data/Images/Normal/0000.JPG,
    candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png

Paths are relative to ROOT; ``label`` is ``normal`` or ``anomaly``; ``split`` is ``train`` or
``test``. Anomalous images keep the defect name ``anomaly`` (VisA does not name defect kinds).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

from .images import DatasetError
from .types import ClassSplit, Sample

SPLIT_FILE = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise DatasetError(
                    f"{csv_path}: missing column(s) {missing}; expected the header {','.join(COLUMNS)} "
                    f"(found {','.join(header) or 'no header'})"
                )
            reader.fieldnames = header
            return [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"cannot read the VisA split file {csv_path}: {error}") from error


def load_visa(root: str | os.PathLike, classes: Sequence[str] | None = None) -> dict[str, ClassSplit]:
    root = Path(root)
    csv_path = root / SPLIT_FILE
    if not csv_path.is_file():
        raise DatasetError(f"{root} is not in the VisA layout: expected the split file {csv_path}")
    rows = _read_rows(csv_path)
    splits: dict[str, ClassSplit] = {}
    anomalies_without_mask: dict[str, list[int]] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{csv_path} line {line}"
        name, split, label_text = row["object"], row["split"].lower(), row["label"].lower()
        if not name:
            raise DatasetError(f"{where}: empty 'object' column")
        if label_text not in LABELS:
            raise DatasetError(f"{where}: label {row['label']!r} is not one of {sorted(LABELS)}")
        if split not in ("train", "test"):
            raise DatasetError(f"{where}: split {row['split']!r} is not 'train' or 'test'")
        label = LABELS[label_text]
        image = root / row["image"]
        if not row["image"] or not image.is_file():
            raise DatasetError(f"{where}: image file not found: {image}")
        target = splits.setdefault(name, ClassSplit(name=name))
        if split == "train":
            if label:
                raise DatasetError(
                    f"{where}: an anomalous image in the train split ({image}); training uses normal images only")
            target.train.append(Sample(str(image), name, 0, "good", None))
            continue
        mask = None
        if label and row["mask"]:
            mask_path = root / row["mask"]
            if not mask_path.is_file():
                raise DatasetError(f"{where}: mask file not found: {mask_path}")
            mask = str(mask_path)
            target.has_masks = True
        elif label:
            anomalies_without_mask.setdefault(name, []).append(line)
        target.test.append(Sample(str(image), name, label, "anomaly" if label else "good", mask))

    for name, lines in anomalies_without_mask.items():
        if splits[name].has_masks:
            raise DatasetError(
                f"{csv_path}: class {name!r} has masks for some anomalous images but not on line(s) {lines[:10]}"
            )
    if not splits:
        raise DatasetError(f"{csv_path} lists no images")
    names = sorted(splits) if classes is None else list(classes)
    unknown = [c for c in names if c not in splits]
    if unknown:
        raise DatasetError(f"unknown class(es) {unknown} in {csv_path}; classes found: {sorted(splits)}")
    for name in names:
        if not splits[name].train:
            raise DatasetError(f"{csv_path}: class {name!r} has no training images (no 'train' rows)")
    return {name: splits[name] for name in names}
