"""Test metrics of a trained run's anomaly map for every set of its levels (no retraining).

    python -m tools.level_scores --run RUN [--data-root DIR] [--classes a,b] [--cache-dir DIR] [--standardized]

rlr's map averages the levels' reconstruction-error maps (DESIGN.md §2); this scores each level
alone, every pair, ..., with the same per-level scores, upsampling, blur and metrics as
``rlr test``, to show which level carries which class's defects. It reads the test labels, so it
is a measurement, not a way to pick a scoring for a run.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from rlr.data import load_dataset, load_mask
from rlr.inference import Scorer, combine_levels, image_scores, open_run
from rlr.features import FeatureCache
from rlr.train import normal_images, scoring_statistics, training_samples
from rlr.metrics import ClassMetrics

from tools.nn_baseline import combinations, format_results, variant_name


@torch.no_grad()
def score_run(run_dir, data_root=None, classes=None, cache_dir=None, batch_size: int = 16,
              standardized: bool = False) -> dict:
    """{class: {"levels 2": metrics, ...}} of a trained run on each class's test split. With
    ``standardized``, also "standardized": the scoring `rlr train --scoring standardized` records, with
    statistics computed here exactly as `rlr train` does (the run's held-out normal images, else its
    training images): scoring does not change training, so this is what that run would score."""
    run, extractor, device = open_run(run_dir, "cpu")
    data = run.checkpoint.get("data", {})
    splits = load_dataset(data_root or data["root"], classes if classes is not None else data.get("classes"))
    cache = FeatureCache(extractor, cache_dir, device=device, progress=False)
    out_indices = list(run.config.out_indices)
    combos = combinations(out_indices)
    size = extractor.input_size
    scorer = Scorer(run.model, extractor, device)
    stats = None
    if standardized:
        samples, held_out = training_samples(splits, run.config.holdout, run.config.seed)
        normal, _, _ = normal_images(splits, samples, held_out, run.config.holdout)
        stats = scoring_statistics(run.model, cache, normal, device)
    results = {}
    for name, split in splits.items():
        table = cache.features([s.path for s in split.test], f"{name} test features")
        metrics = {key: ClassMetrics(split.has_masks) for key in combos + (["standardized"] if stats else [])}
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
            if stats:
                variants["standardized"] = combine_levels(scores, run.model.grids, size, stats)
            for key, maps in variants.items():
                maps = maps.numpy()
                if split.has_masks:
                    metrics[key].update(labels, image_scores(maps), maps, masks)
                else:
                    metrics[key].update(labels, image_scores(maps))
        results[name] = {(key if key == "standardized" else variant_name(key)): m.compute()
                         for key, m in metrics.items()}
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--data-root", help="data set folder (default: the run's)")
    p.add_argument("--classes", help="comma-separated class names (default: the run's)")
    p.add_argument("--cache-dir", help="rlr feature cache folder")
    p.add_argument("--standardized", action="store_true",
                   help="also score with `--scoring standardized` (statistics from the run's own normal images, "
                        "as rlr train computes them)")
    args = p.parse_args(argv)
    results = score_run(args.run, args.data_root, args.classes, args.cache_dir,
                        standardized=args.standardized)
    print(format_results(results))
    return results


if __name__ == "__main__":
    main()
