"""Test metrics of a trained run's anomaly map for every set of its levels (no retraining).

    python tools/level_scores.py --run RUN [--data-root DIR] [--classes a,b] [--cache-dir DIR]

rlr's map averages the levels' reconstruction-error maps (DESIGN.md §2); this scores each level
alone, every pair, ..., with the same per-level scores, upsampling, blur and metrics as
``rlr test``, to show which level carries which class's defects. It reads the test labels, so it
is a measurement, not a way to pick a scoring for a run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from rlr.data import load_dataset, load_mask
from rlr.evaluate import anomaly_maps, image_scores, open_run
from rlr.features import FeatureCache
from rlr.metrics import ClassMetrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nn_baseline import combinations, format_results, variant_name  # noqa: E402


@torch.no_grad()
def score_run(run_dir, data_root=None, classes=None, cache_dir=None, batch_size: int = 16) -> dict:
    """{class: {"levels 2": metrics, ...}} of a trained run on each class's test split."""
    run, extractor, device = open_run(run_dir, "cpu")
    data = run.checkpoint.get("data", {})
    splits = load_dataset(data_root or data["root"], classes if classes is not None else data.get("classes"))
    cache = FeatureCache(extractor, cache_dir, device=device, progress=False)
    out_indices = list(run.config.out_indices)
    combos = combinations(out_indices)
    size = extractor.input_size
    results = {}
    for name, split in splits.items():
        table = cache.features([s.path for s in split.test], f"{name} test features")
        metrics = {combo: ClassMetrics(split.has_masks) for combo in combos}
        for start in range(0, len(split.test), batch_size):
            indices = list(range(start, min(start + batch_size, len(split.test))))
            tokens = table.tensors(indices, device)
            recon = run.model(tokens)
            labels = np.array([split.test[i].label for i in indices])
            masks = np.zeros((len(indices), size, size), dtype=bool)
            for row, i in enumerate(indices):
                if split.test[i].mask_path is not None:
                    masks[row] = load_mask(split.test[i].mask_path, size, image_shape=table.image_shape(i))
            for combo in combos:
                chosen = [out_indices.index(i) for i in combo]
                maps = anomaly_maps([tokens[k] for k in chosen], [recon[k] for k in chosen],
                                    [run.model.grids[k] for k in chosen], size).numpy()
                if split.has_masks:
                    metrics[combo].update(labels, image_scores(maps), maps, masks)
                else:
                    metrics[combo].update(labels, image_scores(maps))
        results[name] = {variant_name(combo): m.compute() for combo, m in metrics.items()}
    return results


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="trained run folder")
    p.add_argument("--data-root", help="data set folder (default: the run's)")
    p.add_argument("--classes", help="comma-separated class names (default: the run's)")
    p.add_argument("--cache-dir", help="rlr feature cache folder")
    args = p.parse_args(argv)
    results = score_run(args.run, args.data_root, args.classes, args.cache_dir)
    print(format_results(results))
    return results


if __name__ == "__main__":
    main()
