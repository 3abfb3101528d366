"""``--input-size auto``: the network's input side from the training images' own sizes.

    auto_input_size(splits) -> InputSizeChoice(size, per_class, reason)

Images are resized to one square side before the backbone. Shrinking large images erases defects
a few pixels wide (on 640 px images with such defects a nearest-neighbour scorer on lite0 features
went from 0.62 to 0.79 image AUROC between a 256 and a 512 px input: docs/recipes.md "Resolution"),
while enlarging small images adds no detail and costs time (road_crack's 128 px tiles scored lower at
320 and 512 px than at 256). So: each class's median shorter side, the largest of them (one unified
model has one input size: a small class is then upsampled, the price of sharing a model with a large
one), rounded to a multiple of ``STEP``, at least ``SMALLEST`` and at most ``LARGEST``.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

from .images import DatasetError, image_info

SMALLEST = 256   # the paper's input: below it the backbone's 16-pixel stride leaves too few tokens
LARGEST = 512    # the masked attention's cost grows with the square of the token count: 512 px is 16x 256 px's
STEP = 64        # keeps both levels' grids (input / 8, input / 16) whole for EfficientNet and ResNet backbones
SAMPLED = 64     # images per class whose headers are read: the median of a sample is enough


@dataclass(frozen=True)
class InputSizeChoice:
    size: int
    per_class: dict          # class -> median shorter side of its training images (pixels)
    reason: str


def shorter_side(path: str) -> int:
    """The shorter side of an image file, from its header (no decoding; the allowed formats only, rlr.data.images)."""
    info = image_info(path)
    return min(info.width, info.height)


def rounded_size(side: float) -> int:
    """A median side -> the input size: the nearest multiple of STEP within [SMALLEST, LARGEST]."""
    return int(min(LARGEST, max(SMALLEST, STEP * round(side / STEP))))


def auto_input_size(splits: dict) -> InputSizeChoice:
    """The input size for training on ``splits`` ({class: ClassSplit}), from their normal training images."""
    per_class = {}
    for name, split in splits.items():
        paths = [s.path for s in split.train]
        if not paths:
            continue
        step = max(1, len(paths) // SAMPLED)
        per_class[name] = int(statistics.median(shorter_side(p) for p in paths[::step][:SAMPLED]))
    if not per_class:
        raise DatasetError("--input-size auto: no training images to measure")
    largest_class = max(per_class, key=per_class.get)
    size = rounded_size(per_class[largest_class])
    sides = ", ".join(f"{k} {v} px" for k, v in per_class.items())
    reason = (f"--input-size auto: {size} px (median shorter side of the training images: {sides}; the largest, "
              f"{largest_class}'s, rounded to a multiple of {STEP} within {SMALLEST}-{LARGEST})")
    if len(set(rounded_size(v) for v in per_class.values())) > 1:
        reason += (f"; one model has one input size: classes with smaller images are upsampled to it, at "
                   f"{(size / SMALLEST) ** 2:.1f}x the tokens of {SMALLEST} px")
    return InputSizeChoice(size, per_class, reason)
