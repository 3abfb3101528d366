"""Training-free nearest-neighbour baseline, per class, on exactly rlr's features (PatchCore-style).

    python -m tools.nn_baseline --data-root ../shared/data/finemini [--classes road_crack] \
        [--input-size 256] [--out-indices 2,3] [--bank-size 16384] [--json nn.json]

For each class and each backbone level: the memory bank holds the training tokens of the class
(a seeded random subset of ``--bank-size`` tokens when there are more; 0 keeps them all); a test
token's score is its Euclidean distance to the nearest bank token. Everything else is rlr's: the
tokens come from rlr's FeatureExtractor through its feature cache (same backbone, input size,
3x3 average pooling, out indices, float16 rounding), and the scoring is rlr.evaluate's (each
level's h x w grid upsampled bilinearly with align_corners=True and the levels averaged; pixel
metrics on that map; image score = max of the map blurred with sigma 4). It prints the metrics
of every set of the levels (each level alone, every pair, ..., all averaged), computing each
level's distances once: the ceilings a reconstruction model on the same features is measured
against.

Cost: one distance per (test token, bank token) pair, computed as exact float32 matrix products
in chunks; with L test tokens per image and a bank of M tokens a class costs about
(test images x L x M) pairs per level. A subset costs the most where it keeps the smallest share
of the class's training tokens (docs/recipes.md, "Small defects (road_crack)": 4096 against 16384
tokens, and realmini's anchors with 4096): quote figures with their bank size.
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from rlr.atomic import atomic_write_json
from rlr.backbone import create_backbone
from rlr.config import OFFLINE_BACKBONE
from rlr.data import load_dataset, load_mask
from rlr.inference import image_scores
from rlr.features import FeatureCache
from rlr.metrics import ClassMetrics

DEFAULT_BANK_SIZE = 16384


def memory_bank(table, level: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(M, C) float32 bank of one level: every training token, or a seeded random ``size`` of them (0: all)."""
    per_image = table.batch([0])[level].shape[1]
    total = len(table) * per_image
    chosen = None if not size or size >= total else torch.randperm(total, generator=generator)[:size].sort().values
    parts = []
    for start in range(0, len(table), 64):
        indices = list(range(start, min(start + 64, len(table))))
        tokens = torch.from_numpy(table.batch(indices)[level]).float().flatten(0, 1)
        if chosen is not None:
            lo, hi = start * per_image, (start + len(indices)) * per_image
            local = chosen[(chosen >= lo) & (chosen < hi)] - lo
            tokens = tokens[local]
        parts.append(tokens)
    return torch.cat(parts)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, query_chunk: int = 1024,
                      bank_chunk: int = 8192) -> torch.Tensor:
    """Euclidean distance of each query (Q, C) to its nearest bank row (M, C) -> (Q,), exact in float32.

    |q - b|^2 = |q|^2 + |b|^2 - 2 q.b in chunks small enough to stay in cache; the minimum over the
    bank is taken before adding |q|^2, and rounding below 0 is clamped.
    """
    if queries.shape[1] != bank.shape[1] or len(bank) == 0:
        raise ValueError(f"queries {tuple(queries.shape)} and bank {tuple(bank.shape)} need the same channel "
                         f"count and a non-empty bank")
    bank_t = bank.t().contiguous()
    bank_sq = (bank * bank).sum(1)
    out = torch.empty(len(queries))
    for i in range(0, len(queries), query_chunk):
        q = queries[i:i + query_chunk]
        best = torch.full((len(q),), float("inf"))
        for j in range(0, len(bank), bank_chunk):
            partial = torch.addmm(bank_sq[j:j + bank_chunk], q, bank_t[:, j:j + bank_chunk], alpha=-2).amin(1)
            torch.minimum(best, partial, out=best)
        out[i:i + query_chunk] = (best + (q * q).sum(1)).clamp_min_(0).sqrt_()
    return out


def level_maps(distances: torch.Tensor, grid: tuple, size: int) -> torch.Tensor:
    """(B, h*w) token distances -> (B, size, size) map, upsampled as rlr.evaluate.anomaly_maps does."""
    h, w = grid
    return F.interpolate(distances.view(-1, 1, h, w), size=(size, size), mode="bilinear",
                         align_corners=True).squeeze(1)


def combinations(out_indices) -> list:
    """Every non-empty set of levels, each as a tuple of out indices, the single levels first."""
    return [combo for size in range(1, len(out_indices) + 1) for combo in itertools.combinations(out_indices, size)]


def variant_name(combo: tuple) -> str:
    return "levels " + "+".join(map(str, combo))


def score_class(cache: FeatureCache, split, bank_size: int, seed: int, batch_size: int = 16,
                progress: bool = True) -> dict:
    """{"levels 2": metrics, "levels 3": metrics, "levels 2+3": metrics, ...} of one class: the map of
    every set of levels (the levels' maps averaged)."""
    extractor = cache.extractor
    out_indices = list(extractor.model.feature_info.out_indices)
    size = extractor.input_size
    train_table = cache.features([s.path for s in split.train], f"{split.name} train features")
    generator = torch.Generator().manual_seed(seed)
    banks = [memory_bank(train_table, level, bank_size, generator) for level in range(len(out_indices))]
    test = split.test
    table = cache.features([s.path for s in test], f"{split.name} test features")
    combos = combinations(out_indices)
    metrics = {combo: ClassMetrics(split.has_masks) for combo in combos}
    for start in tqdm(range(0, len(test), batch_size), desc=f"nn {split.name}", disable=not progress, leave=False):
        indices = list(range(start, min(start + batch_size, len(test))))
        tokens = table.tensors(indices)
        per_level = {i: level_maps(nearest_distances(t.flatten(0, 1), bank).view(len(indices), -1), grid, size)
                     for i, t, bank, grid in zip(out_indices, tokens, banks, extractor.grids)}
        labels = np.array([test[i].label for i in indices])
        masks = np.zeros((len(indices), size, size), dtype=bool)
        for row, i in enumerate(indices):
            if test[i].mask_path is not None:
                masks[row] = load_mask(test[i].mask_path, size, image_shape=table.image_shape(i))
        for combo in combos:
            maps = (sum(per_level[i] for i in combo) / len(combo)).numpy()
            if split.has_masks:
                metrics[combo].update(labels, image_scores(maps), maps, masks)
            else:
                metrics[combo].update(labels, image_scores(maps))
    return {variant_name(combo): m.compute() for combo, m in metrics.items()}


def format_results(results: dict) -> str:
    """One row per class and set of levels: image AUROC, pixel AUROC, AUPRO in percent."""
    def cell(value):
        return "      -" if value is None else f"{100 * value:7.2f}"

    width = max(len(name) for name in results)
    variant_width = max(len(v) for r in results.values() for v in r)
    header = f"{'class':<{width}}  {'levels':<{variant_width}}  I-AUROC  P-AUROC    AUPRO"
    lines = [header, "-" * len(header)]
    for name, variants in results.items():
        for variant, m in variants.items():
            lines.append(f"{name:<{width}}  {variant:<{variant_width}}  {cell(m['image_auroc'])}  "
                         f"{cell(m['pixel_auroc'])}  {cell(m['aupro'])}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="data set folder (any layout rlr reads)")
    p.add_argument("--classes", help="comma-separated class names (default: all)")
    p.add_argument("--layout", default="auto", choices=("auto", "mvtec", "visa", "folder"))
    p.add_argument("--backbone", default=OFFLINE_BACKBONE, help=f"timm model name (default {OFFLINE_BACKBONE})")
    p.add_argument("--backbone-weights", metavar="FILE", help="local weights file for the backbone")
    p.add_argument("--input-size", type=int, default=256, help="image side in pixels (256)")
    p.add_argument("--out-indices", default="2,3", help="backbone feature levels (2,3)")
    p.add_argument("--no-avg-pool", action="store_true", help="skip the 3x3 average pooling of the features")
    p.add_argument("--bank-size", type=int, default=DEFAULT_BANK_SIZE,
                   help=f"tokens per level and class in the memory bank, a seeded random subset "
                        f"(default {DEFAULT_BANK_SIZE}; 0 = every training token)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bank subset (0)")
    p.add_argument("--cache-dir", help="rlr feature cache folder (default: $RLR_CACHE_DIR, else ~/.cache/rlr)")
    p.add_argument("--json", metavar="FILE", help="also write the settings and metrics here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        out_indices = tuple(int(v) for v in args.out_indices.split(",") if v.strip())
    except ValueError:
        p.error(f"--out-indices: expected comma-separated integers, e.g. 2,3; got {args.out_indices!r}")
    if args.bank_size < 0:
        p.error(f"--bank-size must be >= 0 (0 = every training token), got {args.bank_size}")

    started = time.perf_counter()
    extractor = create_backbone(args.backbone, args.backbone_weights, out_indices, args.input_size,
                                not args.no_avg_pool)
    cache = FeatureCache(extractor, args.cache_dir, progress=not args.quiet)
    splits = load_dataset(args.data_root, args.classes, args.layout)
    results = {name: score_class(cache, split, args.bank_size, args.seed, progress=not args.quiet)
               for name, split in splits.items()}
    seconds = time.perf_counter() - started
    print(f"{args.backbone}, input {args.input_size} px, out indices {out_indices} (grids {extractor.grids}), "
          f"bank {args.bank_size or 'all'} tokens per level and class")
    print(format_results(results))
    print(f"{seconds:.0f} s with {torch.get_num_threads()} threads (features included unless cached)")
    output = {"settings": {"backbone": args.backbone, "input_size": args.input_size, "out_indices": list(out_indices),
                           "avg_pool": not args.no_avg_pool, "grids": [list(g) for g in extractor.grids],
                           "bank_size": args.bank_size, "seed": args.seed, "data_root": str(args.data_root)},
              "seconds": seconds, "classes": results}
    if args.json:
        atomic_write_json(args.json, output)
    return output


if __name__ == "__main__":
    main()
