"""The decision threshold that comes with a run, chosen without test labels (docs/usage.md).

At the end of ``rlr train`` the images of each class's held-out share of normal training images
(``RLRConfig.holdout``; images training never saw) are scored, and

    per-class threshold  t_c = max of class c's held-out scores
    global threshold     t   = max of all held-out scores

are stored in ``RUN/threshold.json``. The max of n normal scores is exceeded by a new normal image
of the same distribution with probability about 1 / (n + 1): with 10 % of MVTec's 200-400 images
per class that is a false-positive rate of a few percent. With ``holdout=0`` (the paper recipe,
which keeps the paper's training set exactly) the thresholds come from the training images' own
scores; training fits those images, so such a threshold sits lower and flags more normal images:
the file says so (``source: "train"``).

Normalised score (anomalib's convention, 0.5 = the threshold)::

    normalized = clip(0.5 + (score - t) / (2 * span), 0, 1),   span = t - m  (m = lowest held-out score)

so the lowest normal score maps to 0, the threshold to 0.5 and t + span to 1. (With one held-out
image, span = t.)

No torch here: the exported ONNX file carries the same dict in its metadata, and docs/usage.md's
onnxruntime example applies the formula with numpy alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .atomic import atomic_write_json

THRESHOLD_FILE = "threshold.json"
THRESHOLD_VERSION = 1
RULE = "max of the held-out normal images' scores"


class ThresholdError(ValueError):
    """A threshold file or value cannot be used."""


@dataclass(frozen=True)
class Cut:
    """One threshold and the lowest normal score it was chosen from (for the normalised score)."""

    threshold: float
    low: float
    images: int

    @property
    def span(self) -> float:
        span = self.threshold - self.low
        return span if span > 0 else (abs(self.threshold) or 1.0)

    def normalize(self, score):
        """Normalised score(s) in [0, 1], 0.5 at the threshold (numpy array or float)."""
        value = np.clip(0.5 + (np.asarray(score, dtype=np.float64) - self.threshold) / (2 * self.span), 0.0, 1.0)
        return float(value) if np.ndim(value) == 0 else value

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "low": self.low, "images": self.images}


@dataclass(frozen=True)
class Threshold:
    """The run's global threshold and one per class (``classes`` may lack a class with no held-out image)."""

    global_cut: Cut
    classes: Mapping[str, Cut] = field(default_factory=dict)
    source: str = "holdout"        # "holdout" (images training did not see) or "train" (training images' scores)
    holdout: float = 0.0
    rule: str = RULE

    def cut(self, class_name: Optional[str] = None) -> Cut:
        """The class's cut when it has one, else the global one; an unknown class is an error."""
        if class_name is None or self.source == "user":   # a user's threshold holds for every class
            return self.global_cut
        if class_name in self.classes:
            return self.classes[class_name]
        raise ThresholdError(f"the run has no threshold for class {class_name!r}; it has {sorted(self.classes)} "
                             f"(omit the class to use the global threshold)")

    def to_dict(self) -> dict:
        return {"version": THRESHOLD_VERSION, "rule": self.rule, "source": self.source, "holdout": self.holdout,
                "normalized_score": "clip(0.5 + (score - threshold) / (2 * span), 0, 1), span = threshold - low "
                                    "(threshold when that is 0)",
                "global": self.global_cut.to_dict(), "classes": {k: v.to_dict() for k, v in self.classes.items()}}

    @classmethod
    def from_dict(cls, data: dict, origin: str = "threshold") -> "Threshold":
        try:
            if data.get("version") != THRESHOLD_VERSION:
                raise ThresholdError(f"{origin} has version {data.get('version')!r}, this rlr reads "
                                     f"{THRESHOLD_VERSION}")
            return cls(_cut(data["global"]), {k: _cut(v) for k, v in data["classes"].items()}, data["source"],
                       float(data["holdout"]), data["rule"])
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            if isinstance(err, ThresholdError):
                raise
            raise ThresholdError(f"{origin} is malformed: {err!r}") from None

    @classmethod
    def fixed(cls, value: float) -> "Threshold":
        """A user's threshold (``--threshold``): one value for every class; normalised score = 0.5 * score / value."""
        value = float(value)
        if not math.isfinite(value):
            raise ThresholdError(f"threshold must be a finite number, got {value!r}")
        return cls(Cut(value, 0.0, 0), {}, source="user", rule="given by the user")


def _cut(values: dict) -> Cut:
    cut = Cut(float(values["threshold"]), float(values["low"]), int(values["images"]))
    if not (math.isfinite(cut.threshold) and math.isfinite(cut.low)):
        raise ValueError(f"non-finite threshold {values}")
    return cut


def choose(scores_by_class: Mapping[str, np.ndarray], source: str, holdout: float) -> Threshold:
    """The thresholds of the rule above from each class's normal-image scores (a class may have none)."""
    cuts = {name: Cut(float(np.max(s)), float(np.min(s)), len(s)) for name, s in scores_by_class.items() if len(s)}
    if not cuts:
        raise ThresholdError("no normal image to choose a threshold from")
    everything = np.concatenate([np.asarray(s, dtype=np.float64) for s in scores_by_class.values() if len(s)])
    return Threshold(Cut(float(everything.max()), float(everything.min()), len(everything)), cuts, source, holdout)


def save(run_dir, threshold: Threshold) -> Path:
    return atomic_write_json(Path(run_dir) / THRESHOLD_FILE, threshold.to_dict())


def load(run_dir) -> Optional[Threshold]:
    """The run's stored threshold, or None for a run folder without one (trained before rlr stored them)."""
    path = Path(run_dir) / THRESHOLD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ThresholdError(f"{path} is not readable JSON: {err}") from None
    return Threshold.from_dict(data, str(path))
