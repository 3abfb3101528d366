"""``rlr demo``: the whole pipeline offline, on generated images, in about three minutes on a 2-core CPU.

    DIR/data/       the synthetic MVTec-layout set (rlr.data.synthetic.generate_dataset)
    DIR/cache/      its backbone features
    DIR/run/        the trained unified model, metrics.json and report.html

Settings: the offline backbone tf_efficientnet_lite0 at the paper's 256 px (token grids 32x32
and 16x16) and the ``fast`` recipe (docs/recipes.md: D = 64 / 128, 2 layers, 2 heads,
windows 3 / 5, batch 8, lr 2e-3 with warm-up and cosine decay) for DEMO_EPOCHS epochs of
the small generated set. ``rlr train`` keeps the paper's model and recipe by default.
Running it again on the same DIR reuses the data and features and continues or re-evaluates
the run instead of starting over.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from .config import OFFLINE_BACKBONE, RLRConfig

DEMO_EPOCHS = 30   # 144 generated images: 540 optimiser steps
DEMO_DATA = dict(seed=0, size=256, n_train=36, n_test_good=10, n_test_defect=15)


def demo_config(epochs: Optional[int] = None, **overrides) -> RLRConfig:
    settings = dict(backbone=OFFLINE_BACKBONE, input_size=256, epochs=epochs or DEMO_EPOCHS)
    settings.update(overrides)
    return RLRConfig.from_recipe("fast", **settings)


def run_demo(out="rlr-demo", epochs: Optional[int] = None, device=None, progress: bool = True, *,
             data: Optional[dict] = None, config_overrides: Optional[dict] = None, log=print) -> dict:
    """Generate data, train, evaluate, write the report. Returns the metrics dict.

    ``data`` overrides generate_dataset's arguments and ``config_overrides`` the RLRConfig
    (both for tests: a tiny demo).
    """
    from .data.synthetic import generate_dataset
    from .evaluate import evaluate
    from .run import CHECKPOINT_FILE, REPORT_FILE, load_checkpoint
    from .train import train

    started = time.perf_counter()
    out = Path(out)
    data_root = out / "data"
    run_dir = out / "run"
    cache_dir = out / "cache"
    log(f"rlr demo: generating the synthetic data set in {data_root}")
    generate_dataset(data_root, **dict(DEMO_DATA, **(data or {})))
    config = demo_config(epochs, **(config_overrides or {}))
    if (run_dir / CHECKPOINT_FILE).exists():
        done = load_checkpoint(run_dir)["epoch"]
        log(f"rlr demo: {run_dir} holds a run trained for {done} epochs: continuing it")
        train(run_dir, resume=True, epochs=config.epochs, cache_dir=cache_dir, device=device, progress=progress,
              log=log)
    else:
        train(run_dir, data_root, config, cache_dir=cache_dir, device=device, progress=progress, log=log)
    metrics = evaluate(run_dir, data_root, cache_dir=cache_dir, device=device, report=True, progress=progress,
                       log=lambda *_: None)
    from .evaluate import format_table

    log(format_table(metrics))
    log(f"report: {run_dir / REPORT_FILE}")
    log(f"rlr demo finished in {time.perf_counter() - started:.0f}s")
    log(f"next: look at new images with `rlr serve --run {run_dir}`, or `rlr predict --run {run_dir} IMAGES --out DIR`")
    return metrics
