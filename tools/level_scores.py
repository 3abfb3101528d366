"""Test metrics of a trained run's anomaly map for every set of its levels (no retraining).

    python -m tools.level_scores --run RUN [--data-root DIR] [--classes a,b] [--cache-dir DIR] [--standardized]
                                 [--top-fractions 0.01,0.02]

rlr's map averages the levels' reconstruction-error maps (DESIGN.md §2); this scores each level
alone, every pair, ..., with the same per-level scores, upsampling, blur and metrics as
``rlr test``, to show which level carries which class's defects. It reads the test labels, so it
is a measurement, not a way to pick a scoring for a run.

``--standardized`` adds the standardising scorings, "standardized" and "log-standardized" (rlr.config.SCORINGS).
``--top-fractions`` also scores the run's own map (its scoring: "standardized" with ``--standardized``,
else the mean of all levels) with another image score: the mean of the top fraction of the blurred
map's pixels instead of its maximum (docs/recipes.md, "Capacity": what an extended defect such as a
crack gains from it). rlr itself keeps the paper's maximum.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from rlr.data import load_dataset, load_mask
from rlr.config import STANDARDIZING_SCORINGS
from rlr.inference import Scorer, blur, combine_levels, image_scores, open_run
from rlr.features import FeatureCache
from rlr.train import normal_images, normal_token_scores, pooled_statistics, training_samples
from rlr.metrics import ClassMetrics

from tools.nn_baseline import combinations, format_results, variant_name


def check_fraction(fraction: float) -> float:
    if not 0 < fraction <= 1:
        raise ValueError(f"a top fraction must be in (0, 1], got {fraction}")
    return fraction


def top_fraction_scores(maps: np.ndarray, fraction: float) -> np.ndarray:
    """Image score = mean of the top ``fraction`` of the blurred map's pixels (at least one), (B, S, S) -> (B,)."""
    check_fraction(fraction)
    blurred = blur(maps).reshape(len(maps), -1)
    count = max(1, int(blurred.shape[1] * fraction))
    return np.partition(blurred, -count, axis=1)[:, -count:].mean(axis=1)


@torch.no_grad()
def score_run(run_dir, data_root=None, classes=None, cache_dir=None, batch_size: int = 16,
              standardized: bool = False, top_fractions=()) -> dict:
    """{class: {"levels 2": metrics, ...}} of a trained run on each class's test split. With
    ``standardized``, also "standardized" and "log-standardized": what `rlr train --scoring standardized` /
    `--scoring log-standardized` record, with statistics computed here exactly as `rlr train` does (the run's
    held-out normal images, else its training images): scoring does not change training, so this is what that
    run would score. Each of
    ``top_fractions`` adds "<that map> top <f>": image score by :func:`top_fraction_scores`, pixel metrics
    as the map's own."""
    top_fractions = [check_fraction(f) for f in top_fractions]
    run, extractor, device = open_run(run_dir, "cpu")
    data = run.checkpoint.get("data", {})
    splits = load_dataset(data_root or data["root"], classes if classes is not None else data.get("classes"))
    cache = FeatureCache(extractor, cache_dir, device=device, progress=False)
    out_indices = list(run.config.out_indices)
    combos = combinations(out_indices)
    size = extractor.input_size
    scorer = Scorer(run.model, extractor, device)
    stats = {}   # {scoring: its statistics}
    if standardized:
        samples, held_out = training_samples(splits, run.config.holdout, run.config.seed)
        normal, _, _ = normal_images(splits, samples, held_out, run.config.holdout)
        normal_scores = normal_token_scores(run.model, cache, normal, device)
        stats = {scoring: pooled_statistics(normal_scores, scoring) for scoring in STANDARDIZING_SCORINGS}
    own = "standardized" if stats else combos[-1]   # the map the top-fraction image scores read
    tops = [(f, f"{own if stats else variant_name(own)} top {f:g}") for f in top_fractions]
    results = {}
    for name, split in splits.items():
        table = cache.features([s.path for s in split.test], f"{name} test features")
        metrics = {key: ClassMetrics(split.has_masks)
                   for key in combos + list(stats) + [top for _, top in tops]}
        for start in range(0, len(split.test), batch_size):
            indices = list(range(start, min(start + batch_size, len(split.test))))
            scores = scorer.level_scores(table.tensors(indices, device))   # once per batch, for every variant
            per_level = [combine_levels([s], [g], size) for s, g in zip(scores, run.model.grids)]
            labels = np.array([split.test[i].label for i in indices])
            masks = np.zeros((len(indices), size, size), dtype=bool)
            for row, i in enumerate(indices):
                if split.test[i].mask_path is not None:
                    masks[row] = load_mask(split.test[i].mask_path, size, image_shape=table.image_shape(i))
            variants = {combo: sum(per_level[out_indices.index(i)] for i in combo) / len(combo) for combo in combos}
            for scoring, level_stats in stats.items():
                variants[scoring] = combine_levels(scores, run.model.grids, size, level_stats, scoring)
            for key, maps in variants.items():
                maps = maps.numpy()
                scorings = [(key, image_scores(maps))] + [(top, top_fraction_scores(maps, f))
                                                          for f, top in tops if key == own]
                for metric_key, images in scorings:
                    if split.has_masks:
                        metrics[metric_key].update(labels, images, maps, masks)
                    else:
                        metrics[metric_key].update(labels, images)
        results[name] = {(variant_name(key) if isinstance(key, tuple) else key): m.compute()
                         for key, m in metrics.items()}
    return results


def fractions(text: str) -> tuple:
    """"0.01,0.02" -> (0.01, 0.02), each in (0, 1]."""
    try:
        values = tuple(float(f) for f in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.01,0.02, got {text!r}")
    try:
        return tuple(check_fraction(v) for v in values)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--data-root", help="data set folder (default: the run's)")
    p.add_argument("--classes", help="comma-separated class names (default: the run's)")
    p.add_argument("--cache-dir", help="rlr feature cache folder")
    p.add_argument("--standardized", action="store_true",
                   help="also score with `--scoring standardized` and `--scoring log-standardized` (statistics "
                        "from the run's own normal images, as rlr train computes them)")
    p.add_argument("--top-fractions", type=fractions, default=(),
                   help="comma-separated fractions, e.g. 0.01,0.02: also score the run's map with the mean of "
                        "that top fraction of its blurred pixels as image score (rlr uses their maximum)")
    args = p.parse_args(argv)
    results = score_run(args.run, args.data_root, args.classes, args.cache_dir,
                        standardized=args.standardized, top_fractions=args.top_fractions)
    print(format_results(results))
    return results


if __name__ == "__main__":
    main()
