"""Plot learning curves written by tools/learning_curve.py into docs/img/learning_curves.png.

    python -m tools.plot_learning_curves docs/img/curve-fast.json [more.json ...] --out docs/img/learning_curves.png

Top row: image AUROC, bottom row: pixel AUROC, per class; left column against epochs, right
against cumulative training minutes. Dotted lines: a per-class nearest-neighbour (PatchCore-style)
scorer's figures on realmini, the target of the fast recipe (docs/recipes.md).
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NEAREST_NEIGHBOUR = {"image_auroc": {"metal_plate": 0.995, "bottle": 1.000, "solar_cell": 0.924},
                     "pixel_auroc": {"metal_plate": 0.988, "bottle": 0.988}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("curves", nargs="+")
    p.add_argument("--out", default="docs/img/learning_curves.png")
    args = p.parse_args()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharey="row")
    colours = {}
    for number, path in enumerate(args.curves):
        curve = json.load(open(path))
        style = ("o-", "s--", "^-.", "x-")[number % 4]   # one line style per curve file, one colour per class
        points = curve["points"]
        classes = list(points[0]["metrics"]["classes"])
        for row, metric in enumerate(("image_auroc", "pixel_auroc")):
            for name in classes:
                values = [pt["metrics"]["classes"][name][metric] for pt in points]
                if any(v is None for v in values):
                    continue
                colour = colours.setdefault(name, f"C{len(colours)}")
                label = f"{curve['recipe']}: {name}"
                axes[row, 0].plot([pt["epoch"] for pt in points], values, style, color=colour, label=label)
                axes[row, 1].plot([pt["train_seconds"] / 60 for pt in points], values, style, color=colour,
                                  label=label)
    for row, metric in enumerate(("image_auroc", "pixel_auroc")):
        for name, value in NEAREST_NEIGHBOUR[metric].items():
            for col in (0, 1):
                axes[row, col].axhline(value, ls=":", color=colours.get(name, "grey"), lw=1)
        axes[row, 0].set_ylabel(metric.replace("_", " "))
    axes[1, 0].set_xlabel("epoch")
    axes[1, 1].set_xlabel("training minutes on 2 CPU cores (paper points: cores shared with other jobs)")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle("RLR unified on realmini (tf_efficientnet_lite0); dotted: per-class nearest-neighbour scorer")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
