"""anomalib's Engine against `rlr train` + `rlr test` on one class of an MVTec-layout set (docs/anomalib.md).

    python -m tools.anomalib_parity --data-root ../shared/data/realmini --class bottle --epochs 16 --out DIR

The fast recipe (tf_efficientnet_lite0), the same epochs and seed, three ways:

    rlr       `rlr train` + `rlr test`
    unified   RLR + UnifiedDataModule([Folder]) through Engine.fit / Engine.test: rlr's holdout and epochs
    folder    RLR + anomalib's Folder as it comes (validation: a seeded 10 % of the training images)

Each anomalib run is also written as an rlr run (RLR.save_run) and scored by `rlr test`, which separates what the
training changed from what the evaluation changed. Then the input pipelines, on the class's test images: the
tensors anomalib gives the model (read_image + RLRPreProcessor) against rlr's (load_image + resize + ImageNet
normalisation) at the model's size, and, at --resize-to, anomalib's default pre-processor (torchvision's
antialiased bilinear resize) against rlr's Lanczos, with the backbone tokens' relative difference.
Needs the `anomalib` extra. Writes DIR/parity.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _folder(root: Path, name: str, seed: int, **kwargs):
    from anomalib.data import Folder

    defects = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and p.name != "good")
    masks = [f"ground_truth/{d}" for d in defects] if (root / "ground_truth").is_dir() else None
    return Folder(name=name, root=root, normal_dir="train/good", normal_test_dir="test/good",
                  abnormal_dir=[f"test/{d}" for d in defects], mask_dir=masks, seed=seed, num_workers=2, **kwargs)


def _anomalib_run(kind: str, args, out: Path) -> dict:
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from rlr.evaluate import evaluate
    from rlr.integrations.anomalib import RLR, UnifiedDataModule

    seed_everything(args.seed, workers=True)   # anomalib's own shuffling (the folder run) draws from torch's RNG
    model = RLR(backbone="tf_efficientnet_lite0", recipe="fast", seed=args.seed, cache_dir=args.cache_dir)
    class_root = Path(args.data_root) / args.class_name
    if kind == "unified":
        datamodule = UnifiedDataModule([_folder(class_root, args.class_name, args.seed)])
    else:
        datamodule = _folder(class_root, args.class_name, args.seed, val_split_mode="from_train", val_split_ratio=0.1)
    engine = Engine(max_epochs=args.epochs, default_root_dir=out / f"anomalib-{kind}", logger=False,
                    enable_progress_bar=False)
    started = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - started
    results = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    run = model.save_run(out / f"run-{kind}", overwrite=True)
    rlr_metrics = evaluate(run, args.data_root, classes=[args.class_name], cache_dir=args.cache_dir, progress=False,
                           log=lambda *_: None)["classes"][args.class_name]
    return {"fit_seconds": fit_seconds, "anomalib_test": {k: float(v) for k, v in results.items()},
            "rlr_test_of_its_run": rlr_metrics, "threshold": model.threshold.global_cut.threshold,
            "held_out": model.data["holdout"], "state": {k: v.detach().cpu() for k, v in model.model.rlr.state_dict().items()}}


def _pipelines(args) -> dict:
    import numpy as np
    from anomalib.data.utils import read_image
    from anomalib.models import AnomalibModule

    from rlr.backbone import create_backbone
    from rlr.data import load_dataset, load_image
    from rlr.integrations.anomalib import RLRPreProcessor

    paths = [s.path for s in load_dataset(args.data_root, [args.class_name])[args.class_name].test]
    out = {}
    for size, anomalib_pre in ((256, RLRPreProcessor(256)),
                               (args.resize_to, AnomalibModule.configure_pre_processor((args.resize_to,) * 2))):
        extractor = create_backbone("tf_efficientnet_lite0", input_size=size)
        worst, token_gaps = 0.0, []
        for start in range(0, len(paths), 16):
            chunk = paths[start:start + 16]
            ours = anomalib_pre.transform(torch.stack([read_image(p, as_tensor=True) for p in chunk]))
            theirs = extractor.preprocess([load_image(p) for p in chunk])
            worst = max(worst, float((ours - theirs).abs().max()))
            for a, b in zip(extractor(ours), extractor(theirs)):
                token_gaps.append(float((a - b).norm() / b.norm()))
        label = "rlr_pre_processor" if size == 256 else "anomalib_default_pre_processor"
        out[f"{label}_at_{size}"] = {"max_abs_input_difference": worst,
                                     "max_relative_token_difference": float(np.max(token_gaps))}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--class", dest="class_name", required=True)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resize-to", type=int, default=224, help="size for the resize comparison of the pipelines")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from rlr.config import RLRConfig
    from rlr.evaluate import evaluate
    from rlr.train import train

    figures = {"settings": {"data_root": args.data_root, "class": args.class_name, "epochs": args.epochs,
                            "seed": args.seed, "recipe": "fast", "backbone": "tf_efficientnet_lite0",
                            "threads": torch.get_num_threads()}}
    run = out / "run-rlr"
    started = time.perf_counter()
    if not (run / "checkpoint.pt").exists():
        config = RLRConfig.from_recipe("fast", backbone="tf_efficientnet_lite0", epochs=args.epochs, seed=args.seed)
        train(run, args.data_root, config, classes=[args.class_name], cache_dir=args.cache_dir, progress=False,
              log=lambda *_: None)
    train_seconds = time.perf_counter() - started
    metrics = evaluate(run, cache_dir=args.cache_dir, progress=False, log=lambda *_: None)["classes"][args.class_name]
    reference = torch.load(run / "checkpoint.pt", weights_only=True)
    figures["rlr"] = {"train_seconds": train_seconds, "rlr_test": metrics,
                      "threshold": json.loads((run / "threshold.json").read_text())["global"]["threshold"]}
    for kind in ("unified", "folder"):
        result = _anomalib_run(kind, args, out)
        state = result.pop("state")
        result["max_weight_difference_to_rlr"] = max(float((state[k] - reference["model"][k].float()).abs().max())
                                                     for k in state)
        result["image_auroc_minus_rlr"] = result["anomalib_test"]["image_AUROC"] - metrics["image_auroc"]
        figures[kind] = result
        print(kind, json.dumps({k: v for k, v in result.items() if k != "held_out"}, indent=1), flush=True)
    figures["pipelines"] = _pipelines(args)
    (out / "parity.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
    return figures


if __name__ == "__main__":
    main()
