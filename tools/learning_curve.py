"""Learning curve of a recipe: train epoch by epoch, test after each evaluated epoch.

    python -m tools.learning_curve --data-root ../shared/data/realmini --recipe fast --epochs 3 \
        --out runs/curve-fast --json docs/img/curve-fast.json [--eval-epochs 1,2,3] [--stop-after N]

The run is trained with ``rlr.train.train`` (resuming one epoch at a time, which is exact), and
after each epoch in ``--eval-epochs`` the test split is scored with ``rlr.evaluate.evaluate``.
The test metrics are only recorded: they never influence training (the schedule and the stopping
epoch are fixed in advance). The JSON holds one entry per evaluated epoch with the cumulative
training seconds (evaluation time excluded) and the per-class metrics.
"""
import argparse
import time

from rlr.atomic import atomic_write_json
from rlr.config import OFFLINE_BACKBONE, RECIPES, RLRConfig
from rlr.evaluate import evaluate
from rlr.train import train

from tools import level_scores


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--recipe", default="fast")
    p.add_argument("--epochs", type=int, help="total epochs (default: the recipe's)")
    p.add_argument("--eval-epochs", help="comma-separated epochs to test after (default: every epoch)")
    p.add_argument("--stop-after", type=int, help="stop after this epoch (the schedule keeps its --epochs horizon; "
                                                  "e.g. the first epochs of the 200-epoch paper recipe)")
    p.add_argument("--out", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--cache-dir")
    p.add_argument("--backbone", help=f"timm model name (default: the recipe's where it names one, else {OFFLINE_BACKBONE}, "
                                      f"offline)")
    p.add_argument("--input-size", type=int, help="image side in pixels (default 256)")
    p.add_argument("--out-indices", help="backbone feature levels, e.g. 2,3 (the default)")
    p.add_argument("--window", action="append", metavar="SIDE=K",
                   help="attention window for a token-grid side, e.g. 48=7 (repeatable; added to the recipe's)")
    p.add_argument("--scoring", help="the run's scoring (default: the recipe's)")
    p.add_argument("--d-models", help="transformer width per level, e.g. 128,256 (default: the recipe's)")
    p.add_argument("--heads", type=int, help="attention heads (default: the recipe's)")
    p.add_argument("--layers", type=int, help="encoder layers per level (default: the recipe's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the recipe's)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--level-scores", action="store_true",
                   help="also record, at each evaluated epoch, every level set alone and the standardising scorings "
                        "(tools.level_scores: the same weights scored each way)")
    args = p.parse_args()
    windows = None
    if args.window:
        windows = dict(RLRConfig.from_recipe(args.recipe).windows)
        windows.update({int(side): int(k) for side, k in (w.split("=") for w in args.window)})
    out_indices = tuple(int(i) for i in args.out_indices.split(",")) if args.out_indices else None
    backbone = args.backbone or RECIPES[args.recipe].get("backbone", OFFLINE_BACKBONE)
    config = RLRConfig.from_recipe(args.recipe, backbone=backbone, epochs=args.epochs,
                                   input_size=args.input_size, out_indices=out_indices, windows=windows,
                                   scoring=args.scoring, heads=args.heads, layers=args.layers, lr=args.lr,
                                   batch_size=args.batch_size, seed=args.seed,
                                   d_models=tuple(int(d) for d in args.d_models.split(",")) if args.d_models else None)
    evals = {int(e) for e in args.eval_epochs.split(",")} if args.eval_epochs else set(range(1, config.epochs + 1))
    points = []
    for epoch in range(1, min(config.epochs, args.stop_after or config.epochs) + 1):
        if epoch == 1:
            result = train(args.out, args.data_root, config, epochs=config.epochs, cache_dir=args.cache_dir,
                           progress=False, stop_after=1)
        else:
            result = train(args.out, resume=True, cache_dir=args.cache_dir, progress=False, stop_after=epoch)
        if epoch in evals:
            started = time.perf_counter()
            metrics = evaluate(args.out, cache_dir=args.cache_dir, progress=False)
            point = {"epoch": epoch, "train_seconds": sum(h["seconds"] for h in result.history),
                     "loss": result.history[-1]["loss"], "metrics": metrics}
            if args.level_scores:
                point["level_scores"] = level_scores.score_run(args.out, cache_dir=args.cache_dir, standardized=True)
                print(f"epoch {epoch}:\n{level_scores.format_results(point['level_scores'])}", flush=True)
            point["eval_seconds"] = time.perf_counter() - started
            points.append(point)
            atomic_write_json(args.json, {"recipe": args.recipe, "config": config.to_dict(),
                                          "history": result.history, "points": points})


if __name__ == "__main__":
    main()
