"""The records every layout reader returns."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sample:
    path: str                 # image file
    class_name: str
    label: int                # 0 good, 1 anomalous
    defect: str               # "good" or the defect folder name
    mask_path: str | None     # None for good images, or when the class has no ground truth


@dataclass
class ClassSplit:
    name: str
    train: list[Sample] = field(default_factory=list)   # normal images (label 0)
    test: list[Sample] = field(default_factory=list)
    has_masks: bool = False   # False -> pixel metrics are null for this class
