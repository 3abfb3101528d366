"""A run folder: its config, its checkpoint, and loading a trained model back.

    RUN/config.json      the RLRConfig (format version checked)
    RUN/checkpoint.pt    the RLRConfig it was trained with, model weights, level shapes, optimiser and
                         RNG states, epoch (and step within it), history, training-set description,
                         and a standardising scoring's per-level statistics (``level_stats``, None
                         under the paper's scoring); rewritten atomically after every epoch (and every
                         --save-every steps)

The checkpoint carries its own config, and loading a run compares it with config.json: heads,
windows or avg_pool change no parameter shape, so an edited config.json would otherwise load
the weights "successfully" into another model and score wrongly. Checkpoints written before
the config travelled with them (same format version) load unchecked.
    RUN/metrics.json     written by `rlr test`
    RUN/report.html      written by `rlr test --report`
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .atomic import atomic_save
from .config import CONFIG_FILE, FORMAT_VERSION, ConfigError, RLRConfig
from .model import RLRModel

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
CHECKPOINT_KIND = "rlr-run"


class RunError(ValueError):
    """A run folder or its checkpoint cannot be used."""


def save_checkpoint(path, state: dict, config: RLRConfig) -> Path:
    """Write a checkpoint with its ``config`` atomically (rlr.atomic): a crash never leaves a torn checkpoint."""
    state = dict(state, config=config.to_dict(), format_version=FORMAT_VERSION, kind=CHECKPOINT_KIND)
    return atomic_save(path, lambda handle: torch.save(state, handle))


def load_checkpoint(run_dir, map_location="cpu") -> dict:
    path = Path(run_dir) / CHECKPOINT_FILE
    if not Path(run_dir).is_dir():
        raise RunError(f"run folder {run_dir} does not exist (create one with `rlr train --out {run_dir}`)")
    if not path.is_file():
        raise RunError(f"{path} not found: the run in {run_dir} has no checkpoint yet (train it with `rlr train`)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file, whatever the unpickling error
        raise RunError(f"{path} is not a readable rlr checkpoint: {err}") from None
    if not isinstance(state, dict) or state.get("kind") != CHECKPOINT_KIND:
        raise RunError(f"{path} is not an rlr run checkpoint (for checkpoints of the original RLR code use "
                       f"`rlr import-official`)")
    if state.get("format_version") != FORMAT_VERSION:
        raise RunError(f"{path} has format_version {state.get('format_version')!r}, this rlr reads version "
                       f"{FORMAT_VERSION}: the run was written by another rlr version")
    return state


@dataclass
class TrainedRun:
    """A run loaded for inference: config, model in eval mode, and the checkpoint's metadata."""

    folder: Path
    config: RLRConfig
    model: RLRModel
    checkpoint: dict
    level_stats: Optional[list] = None   # (mean, std) per level for a standardising scoring, else None


def stored_level_stats(folder: Path, config: RLRConfig, state: dict) -> Optional[list]:
    """The checkpoint's per-level (mean, std) when the run's scoring needs them (checked), else None."""
    if config.scoring == "paper":
        return None
    stats = state.get("level_stats")
    if stats is None:
        raise RunError(f"{folder / CHECKPOINT_FILE} uses scoring {config.scoring!r} but holds no level statistics yet: "
                       f"`rlr train` computes them when it stops; resume it (`rlr train --resume --out {folder}`)")
    if (len(stats) != len(state["levels"]) or any(len(pair) != 2 for pair in stats)
            or not all(math.isfinite(m) and math.isfinite(s) and s > 0 for m, s in stats)):
        raise RunError(f"{folder / CHECKPOINT_FILE} holds malformed level statistics {stats!r}: one (mean, std > 0) "
                       f"per level is needed ({len(state['levels'])} levels)")
    return [(float(m), float(s)) for m, s in stats]


def build_model(config: RLRConfig, levels: list) -> RLRModel:
    """The model of a checkpoint's ``levels`` entry ([{"channels": C, "grid": [h, w]}, ...])."""
    return RLRModel(config, [lv["channels"] for lv in levels], [tuple(lv["grid"]) for lv in levels])


def level_shapes(model: RLRModel) -> list:
    return [{"channels": c, "grid": list(g)} for c, g in zip(model.channels, model.grids)]


def read_run(run_dir) -> tuple:
    """(config, checkpoint) of a run folder, config.json checked against the checkpoint's own config."""
    folder = Path(run_dir)
    if not (folder / CONFIG_FILE).is_file() and not (folder / CHECKPOINT_FILE).is_file():
        load_checkpoint(folder)   # names what is missing: the folder, or any checkpoint
    try:
        config = RLRConfig.load(folder)
    except ConfigError as err:
        raise RunError(str(err)) from None
    state = load_checkpoint(folder)
    if state.get("config") is not None:
        try:
            trained = RLRConfig.from_dict(state["config"])
        except (ConfigError, TypeError) as err:
            raise RunError(f"{folder / CHECKPOINT_FILE} holds an unreadable config: {err}") from None
        differences = trained.differences(config)
        if differences:
            listed = "; ".join(f"{name}: {theirs!r} in {CONFIG_FILE}, {mine!r} in {CHECKPOINT_FILE}"
                               for name, (mine, theirs) in differences.items())
            raise RunError(f"{folder / CONFIG_FILE} does not match the config the checkpoint was trained with ({listed}); "
                           f"the weights only fit the checkpoint's settings: restore {CONFIG_FILE}")
    return config, state


def load_run(run_dir, device="cpu", backend: Optional[str] = None) -> TrainedRun:
    """Load a trained run folder for evaluation or prediction (``backend`` None = fastest available)."""
    folder = Path(run_dir)
    config, state = read_run(folder)
    # The kernel backend is a runtime choice (the device may differ from training): the one asked
    # for, else the fastest available, whatever the run trained with.
    config.backend = backend
    model = build_model(config, state["levels"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise RunError(f"{folder / CHECKPOINT_FILE} does not match {folder / 'config.json'}: {err}") from None
    return TrainedRun(folder, config, model.to(device).eval(), state, stored_level_stats(folder, config, state))
