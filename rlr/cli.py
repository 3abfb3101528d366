"""The ``rlr`` command line: train, test, predict, export, serve, import-official, cache, demo (DESIGN.md §4).

Errors in the user's input (missing data set, unknown class, corrupt image, run folder of
another version, ...) end the command with ``rlr: error: <what and where>`` and exit status 2;
set RLR_DEBUG=1 to see the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from .config import (OFFLINE_BACKBONE, PAPER_BACKBONE, PRECISIONS, RECIPES, SCHEDULES, SCORINGS, WIDE_BACKBONE,
                     ConfigError)

EXAMPLES = """\
examples:
  rlr demo --out rlr-demo                               # generated data, offline backbone, ~10 min on CPU
  rlr train --data-root mvtec_ad --out runs/mvtec       # the paper: all classes, tf_efficientnet_b6, 200 epochs
  rlr train --data-root mvtec_ad --classes bottle,cable --backbone tf_efficientnet_lite0 --epochs 20 --out runs/two
  rlr test --run runs/mvtec --report                    # RUN/metrics.json and RUN/report.html
  rlr predict --run runs/mvtec new_images/ --out predictions
  rlr export --run runs/mvtec --format onnx --out mvtec.onnx
  rlr import-official save/latest.pth --out runs/official
  rlr cache list                                        # feature cache folders and their sizes
  rlr cache clear --older-than 30                       # delete those unused for 30 days
  rlr serve --run runs/mvtec                            # inspection page on http://127.0.0.1:8000/
"""


def _csv_ints(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 2,3; got {text!r}") from None


def _window(text: str) -> tuple:
    side, sep, k = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(side), int(k)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIDE=WINDOW, e.g. 16=5; got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _add_runtime(p: argparse.ArgumentParser, cache: bool = True) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    g.add_argument("--backend", choices=("reference", "triton", "cpp", "cuda"),
                   help="attention kernel backend (default: the fastest available for the device)")
    if cache:
        g.add_argument("--cache-dir", help="feature cache folder (default: $RLR_CACHE_DIR, else ~/.cache/rlr)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_backbone(p: argparse.ArgumentParser, defaults: bool) -> None:
    g = p.add_argument_group("backbone")
    g.add_argument("--backbone", default=PAPER_BACKBONE if defaults else None,
                   help=f"timm model name (default {PAPER_BACKBONE}, the paper's; needs the timm hub once"
                        + ("" if defaults else f"; the wide recipe's: {WIDE_BACKBONE}") + "). "
                        f"Offline: {OFFLINE_BACKBONE}, {WIDE_BACKBONE}")
    g.add_argument("--backbone-weights", metavar="FILE", help="local weights file for the backbone")
    if defaults:
        g.add_argument("--input-size", type=int, default=256, help="image side in pixels (256)")
    else:
        g.add_argument("--input-size", type=_input_size, metavar="N|auto",
                       help="image side in pixels (256); auto: from the training images' sizes (each class's median "
                            "shorter side, the largest, rounded to a multiple of 64 within 256-512: larger images "
                            "keep small defects, at up to 4x the cost; docs/recipes.md)")
    g.add_argument("--out-indices", type=_csv_ints, default=(2, 3) if defaults else None,
                   help="backbone feature levels (2,3)")
    g.add_argument("--no-avg-pool", action="store_true", help="skip the 3x3 average pooling of the features")


def _input_size(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a side in pixels (e.g. 384) or auto; got {text!r}") from None


def _size(text: str) -> tuple:
    height, sep, width = text.lower().partition("x")
    try:
        if not sep:
            raise ValueError
        return int(height), int(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 256x256; got {text!r}") from None


def _add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="inference precision: fp32 (default), or bf16/fp16 where the hardware has it (the "
                        "backbone's and the RLR levels' weights in that type; an error elsewhere; speed "
                        "and AUROC cost on realmini in docs/usage.md)")
    p.add_argument("--backbone-runtime", choices=("fast", "eager"), default="fast",
                   help="fast (default): the backbone with each BatchNorm folded into its convolution and the "
                        "activation fused into it (one oneDNN call per conv on a CPU), channels-last, weights in "
                        "the precision's type; the same scores to float32 rounding. eager: timm's module as built "
                        "(under autocast for bf16/fp16), for debugging. No compile step: both start at once")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlr", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="RLR unified multi-class anomaly detection: one model for all product classes, trained on "
                    "normal images only.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # train
    p = sub.add_parser("train", help="train one model on the normal images of all classes",
                       description="Train one unified RLR model on the train/good images of the chosen classes. "
                                   "Writes RUN/config.json and RUN/checkpoint.pt (rewritten every epoch, "
                                   "and every --save-every steps).")
    p.add_argument("--data-root", help="data set folder (MVTec AD / MPDD / BTAD layout, VisA, or a folder of images)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to create (or to continue with --resume)")
    p.add_argument("--classes", help="comma-separated class names (default: all)")
    p.add_argument("--layout", choices=("auto", "mvtec", "visa", "folder"), default="auto", help="data set layout")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly (its own settings; only --epochs may change)")
    p.add_argument("--save-every", type=int, metavar="N",
                   help="also write the checkpoint every N optimiser steps (default: after every epoch only); "
                        "--resume continues a mid-epoch checkpoint exactly")
    g = p.add_argument_group("training (defaults from --recipe)")
    g.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                   help="paper: Adam lr 1e-4, batch 4, 200 epochs (default); fast: for a CPU, D = 64/128, "
                        "2 layers, 2 heads, windows 3/5, class balance 0.5, batch 8, lr 2e-3 with 50 warm-up steps "
                        "and cosine decay, 64 epochs; wide: the fast recipe at D = 256/256 with 4 heads, lr 1e-3, "
                        "32 epochs, log-standardized scoring, on tf_efficientnet_lite2 (offline), for fine texture "
                        "and small defects (docs/recipes.md)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    g.add_argument("--jitter-scale", type=float, help="feature jitter s (default 4)")
    g.add_argument("--schedule", choices=SCHEDULES, help="learning rate after the warm-up: constant (paper) or "
                                                          "cosine decay to 0 at the last epoch")
    g.add_argument("--warmup-steps", type=int, help="optimiser steps of linear learning-rate warm-up (paper: 0)")
    g.add_argument("--class-balance", type=float, nargs="?", const=1.0, metavar="S",
                   help="how an epoch samples the classes: each in proportion to (its image count)^(1-S); "
                        "0 = each image once (paper), 1 (the flag alone) = every class equally often, "
                        "0.5 = square root (fast recipe); small classes repeat their images")
    g.add_argument("--holdout", type=float, metavar="SHARE",
                   help="share of each class's normal training images kept out of training to choose the run's "
                        "threshold (RUN/threshold.json; fast recipe 0.1, paper 0: the threshold then comes from the "
                        "training images' own scores); classes with under 5 images keep all (docs/usage.md)")
    g.add_argument("--scoring", choices=SCORINGS,
                   help="how the levels' maps combine: paper (default of the paper and fast recipes: their mean); "
                        "standardized: each level's token scores first standardised by their mean and std on normal images "
                        "(the held-out ones, else the training images), so that no level's scale drowns the other's; "
                        "log-standardized (the wide recipe's default): the same on the scores' logarithms, a weighted "
                        "geometric mean of the levels, so that one level's long tail does not outvote the other. "
                        "Recorded with the run (docs/recipes.md)")
    g.add_argument("--precision", choices=PRECISIONS,
                   help="auto (default): bf16 autocast where the hardware multiplies bf16 natively (CUDA; CPUs "
                        "with AMX or AVX512-BF16), fp32 elsewhere; evaluation always runs in fp32")
    g = p.add_argument_group("model")
    g.add_argument("--heads", type=int, help="attention heads (8)")
    g.add_argument("--layers", type=int, help="encoder layers per level (4)")
    g.add_argument("--ref-len", type=int, help="reference copies R (1)")
    g.add_argument("--d-models", type=_csv_ints, help="transformer width per level (default BASE*2**(i-1): 256,512)")
    g.add_argument("--d-model-base", type=int, help="BASE of the default widths (paper 128)")
    g.add_argument("--window", type=_window, action="append", metavar="SIDE=K",
                   help="attention window for a grid side, e.g. 8=3 (repeatable; defaults: the recipe's, paper 16=5 32=7 64=11, fast 16=3 32=5 64=9)")
    _add_backbone(p, defaults=False)
    _add_runtime(p)
    g = p.add_argument_group("several GPUs or machines: launch with torchrun (docs/distributed.md)")
    g.add_argument("--dist-timeout", type=float, metavar="MINUTES",
                   help="how long a rank waits for the others before the job stops (default 30)")

    # test
    p = sub.add_parser("test", help="evaluate a run on the test images; writes RUN/metrics.json",
                       description="Score every test image of each class, compute image and pixel metrics, write "
                                   "RUN/metrics.json and print the table.")
    p.add_argument("--run", required=True, metavar="RUN", help="trained run folder")
    p.add_argument("--data-root", help="data set folder (default: the one the run trained on)")
    p.add_argument("--classes", help="comma-separated class names (default: the run's classes)")
    p.add_argument("--layout", choices=("auto", "mvtec", "visa", "folder"), help="data set layout (default: the run's)")
    p.add_argument("--report", nargs="?", const=True, default=None, metavar="PATH",
                   help="also write the HTML report (default path RUN/report.html)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images scored together (16)")
    _add_precision(p)
    _add_runtime(p)

    # predict
    p = sub.add_parser("predict", help="score new images; write scores.csv and heat-map overlays",
                       description="Score images with a trained run: OUT/scores.csv (path, score, label, "
                                   "normalized_score, error; written as it goes) and OUT/overlays/*.png. Labels use "
                                   "the threshold the run chose at the end of training (RUN/threshold.json). An "
                                   "unreadable image gets its error in scores.csv and the others go on; the exit "
                                   "status is then 1.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR",
                   help="image files, or folders read with their subfolders (scores.csv names each image by its "
                        "path relative to the folder; overlays/, maps/ and masks/ mirror that tree)")
    p.add_argument("--run", required=True, metavar="RUN", help="trained run folder")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (a reused one loses the earlier call's overlays, maps and masks)")
    p.add_argument("--threshold", type=float,
                   help="score at or above which an image is labelled anomalous (default: the run's stored threshold)")
    p.add_argument("--class", dest="class_name", metavar="NAME",
                   help="use the run's threshold for this class (default: the global one)")
    p.add_argument("--save-maps", choices=("npy", "png"),
                   help="also write each blurred anomaly map at the image's size (OUT/maps: float32 .npy, or a "
                        "16-bit PNG of the normalised map) and the binary mask at the threshold (OUT/masks)")
    p.add_argument("--vmin", type=float, help="anomaly value at the bottom of the colour scale")
    p.add_argument("--vmax", type=float, help="anomaly value at the top of the colour scale")
    p.add_argument("--no-overlays", action="store_true", help="write scores.csv only")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images scored together (16)")
    _add_precision(p)
    _add_runtime(p, cache=False)

    # export
    p = sub.add_parser("export", help="write the run as one ONNX graph: image batch -> score, anomaly map",
                       description="Export a trained run as ONE ONNX graph from an RGB image batch (N, 3, H, W) to "
                                   "the image score (N,) and the blurred anomaly map (N, S, S): resize, ImageNet "
                                   "normalisation, backbone, both RLR levels in standard operators, scoring and blur. "
                                   "The run's threshold and config travel in the file's metadata. Runs with "
                                   "onnxruntime alone (docs/usage.md).")
    p.add_argument("--run", required=True, metavar="RUN", help="trained run folder")
    p.add_argument("--out", required=True, metavar="FILE", help="file to write (e.g. model.onnx)")
    p.add_argument("--format", choices=("onnx", "openvino"), default="onnx",
                   help="onnx (default), or openvino: the same graph converted by OpenVINO to its IR (--out NAME.xml, "
                        "weights in NAME.bin; needs `pip install openvino`)")
    p.add_argument("--image-size", type=_size, metavar="HxW",
                   help="the input images' size; resized inside the graph exactly as rlr does (Lanczos) "
                        "(default: the run's input size, no resize)")
    p.add_argument("--input-dtype", choices=("uint8", "float32"), default="uint8",
                   help="uint8 RGB 0..255 (default; what image files decode to) or float32 RGB in [0, 1]")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")

    # import-official
    p = sub.add_parser("import-official", help="turn a checkpoint of the original RLR code into a run folder",
                       description="Convert a checkpoint of the original RLR code ({'state_dict': [...], ...}) into "
                                   "a run folder usable by `rlr test` and `rlr predict`. The settings below must "
                                   "match the original run (its defaults are given).")
    p.add_argument("checkpoint", help="the original code's .pth file (e.g. save/PREFIX/latest.pth)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder to create")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ref-len", type=int, default=1)
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow arbitrary pickled objects in the file (only for files you trust)")
    p.add_argument("--window", type=_window, action="append", metavar="SIDE=K",
                   help="attention window for a grid side (defaults 16=5 32=7 64=11, the original's)")
    _add_backbone(p, defaults=True)

    # cache
    p = sub.add_parser("cache", help="show or clear the backbone feature cache",
                       description="The feature cache keeps every image's backbone tokens (one folder per backbone "
                                   "and input settings) so that training, testing and later runs skip the backbone. "
                                   "It lives in --cache-dir, else $RLR_CACHE_DIR, else $XDG_CACHE_HOME/rlr, else "
                                   "~/.cache/rlr; deleting it is always safe (features are recomputed).")
    p.add_argument("action", choices=("list", "clear"), help="list: folders with images, size and last use; "
                                                            "clear: delete folders")
    p.add_argument("--older-than", type=float, metavar="DAYS",
                   help="clear only folders not used for DAYS days (default: clear all)")
    p.add_argument("--cache-dir", help="feature cache folder (default: $RLR_CACHE_DIR, else ~/.cache/rlr)")

    # serve
    p = sub.add_parser("serve", help="an inspection page and an HTTP endpoint for a trained run",
                       description="Serve a trained run: the inspection page at / (drop images, see heat maps, move "
                                   "the threshold), GET /health, GET /info, POST /predict (multipart field 'file', "
                                   "repeatable) -> JSON. Listens on 127.0.0.1 unless another --host is given. No "
                                   "authentication: to expose it, put a reverse proxy with TLS and authentication in "
                                   "front (docs/serve.md, Security).")
    p.add_argument("--run", required=True, metavar="RUN", help="trained run folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--allowed-hosts", metavar="NAMES",
                   help="comma-separated names the Host header may give, e.g. inspect.example.com (a reverse "
                        "proxy's name), '*.example.com', or '*' for any; others are refused with 421 (against DNS "
                        "rebinding). Default: localhost, 127.0.0.1, ::1 and --host; for 0.0.0.0 also this "
                        "machine's name and addresses")
    _add_precision(p)
    g = p.add_argument_group("limits (over one: an answer at once, before the work is done)")
    g.add_argument("--max-batch", type=_positive_int, default=16, help="images scored together at most (16)")
    g.add_argument("--queue-size", type=_positive_int, default=64,
                   help="requests in progress at most (read, waiting or scored); one more is answered 503 (64)")
    g.add_argument("--max-file-mb", type=_positive_float, default=25.0,
                   help="largest upload per file, MB; a larger one is answered 413 while it is read (25)")
    g.add_argument("--max-files", type=_positive_int, default=32, help="images per request at most (32)")
    g.add_argument("--max-pixels", type=_positive_int, default=50_000_000,
                   help="largest image, in pixels; a larger one gets its own error (50000000)")
    g.add_argument("--request-memory-mb", type=_positive_float, default=2048.0,
                   help="memory all requests together may hold at once, MB: uploads as they arrive, then what "
                        "decoding and each answer need (from the image headers); a request it cannot cover now is "
                        "answered 503, one that could never fit 413 (2048)")
    _add_runtime(p, cache=False)

    # demo
    p = sub.add_parser("demo", help="the whole pipeline offline on generated images (about 3 minutes on a 2-core CPU)",
                       description="Generate a small synthetic data set, train one unified model with the offline "
                                   "backbone, evaluate it and write the HTML report. No network needed.")
    p.add_argument("--out", default="rlr-demo", metavar="DIR", help="output folder (default ./rlr-demo)")
    p.add_argument("--epochs", type=int, help="override the demo's epoch count")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _train_config(args):
    from .config import RLRConfig

    windows = None
    if args.window:   # given sides override the recipe's windows, the others keep them
        windows = {**RLRConfig.from_recipe(args.recipe).windows, **dict(args.window)}
    return RLRConfig.from_recipe(
        args.recipe, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        jitter_scale=args.jitter_scale, precision=args.precision, heads=args.heads, layers=args.layers,
        schedule=args.schedule, warmup_steps=args.warmup_steps, class_balance=args.class_balance, holdout=args.holdout,
        scoring=args.scoring, d_model_base=args.d_model_base,
        ref_len=args.ref_len, d_models=args.d_models, windows=windows, backbone=args.backbone, backbone_weights=args.backbone_weights,
        input_size=args.input_size, out_indices=args.out_indices, avg_pool=False if args.no_avg_pool else None,
        backend=args.backend)


_RESUME_FIXED = ("lr", "batch_size", "seed", "jitter_scale", "precision", "heads", "layers", "ref_len", "d_models",
                 "schedule", "warmup_steps", "class_balance", "d_model_base", "holdout",
                 "scoring", "window",
                 "backbone", "backbone_weights", "input_size", "out_indices", "classes")


def _cmd_train(args) -> int:
    from pathlib import Path

    from .distributed import is_main_process
    from .run import CHECKPOINT_FILE
    from .train import train

    given = [name for name in _RESUME_FIXED if getattr(args, name) is not None]
    if args.no_avg_pool or args.recipe != "paper":
        given.append("no_avg_pool" if args.no_avg_pool else "recipe")
    if args.resume and (Path(args.out) / CHECKPOINT_FILE).exists():
        if given:
            raise ConfigError(f"--resume continues with the run's own settings; only --epochs may change, but "
                              f"{', '.join('--' + g.replace('_', '-') for g in given)} given")
        result = train(args.out, args.data_root, resume=True, epochs=args.epochs, backend=args.backend,
                       cache_dir=args.cache_dir, device=args.device, progress=not args.quiet,
                       dist_timeout_minutes=args.dist_timeout, save_every=args.save_every)
    else:
        # A new run; with --resume, a run folder without a checkpoint (stopped before its first epoch ended),
        # which train() starts from the beginning: with the settings given, else those of its config.json.
        if not args.data_root:
            raise ConfigError("--data-root DIR is required to start a run"
                              + (f" ({args.out} holds no checkpoint to resume)" if args.resume else ""))
        if args.input_size == "auto":
            from .data import load_dataset
            from .data.sizes import auto_input_size

            choice = auto_input_size(load_dataset(args.data_root, args.classes, args.layout))
            print(choice.reason)
            args.input_size = choice.size
        config = _train_config(args) if given or not args.resume else None
        result = train(args.out, args.data_root, config, classes=args.classes, layout=args.layout,
                       resume=args.resume, epochs=args.epochs if config is None else None, backend=args.backend,
                       cache_dir=args.cache_dir, device=args.device, progress=not args.quiet,
                       dist_timeout_minutes=args.dist_timeout, save_every=args.save_every)
    if result.history and is_main_process():
        last = result.history[-1]
        print(f"trained {result.epochs} epochs on {result.train_images} images in {result.seconds:.1f}s "
              f"(last epoch: loss {last['loss']:.5f}, {last['images_per_second']:.1f} img/s); run: {result.run_dir}\n"
              f"next: rlr test --run {result.run_dir}")
    return 0


def _cmd_test(args) -> int:
    from .evaluate import evaluate

    evaluate(args.run, args.data_root, classes=args.classes, layout=args.layout, cache_dir=args.cache_dir,
             device=args.device, backend=args.backend, batch_size=args.batch_size, report=args.report,
             progress=not args.quiet, precision=args.precision, runtime=args.backbone_runtime)
    return 0


def _cmd_predict(args) -> int:
    from .predict import predict

    results = predict(args.run, args.inputs, args.out, threshold=args.threshold, class_name=args.class_name,
                      vmin=args.vmin, vmax=args.vmax, device=args.device, backend=args.backend,
                      precision=args.precision, batch_size=args.batch_size, overlays=not args.no_overlays,
                      save_maps=args.save_maps, progress=not args.quiet, runtime=args.backbone_runtime)
    for row in results:
        print(_predict_line(row))
    return 1 if any(row.error for row in results) else 0


def _predict_line(row) -> str:
    """One printed line per image: what docs/usage.md's onnxruntime example prints too."""
    if row.error:
        return f"{row.path}  error: {row.error}"
    label = "-" if row.label is None else ("anomalous" if row.label else "normal")
    normalized = "-" if row.normalized_score is None else f"{row.normalized_score:.4f}"
    return f"{row.path}  score {row.score:.6f}  normalized {normalized}  {label}"


def _cmd_export(args) -> int:
    from .export import export

    path = export(args.run, args.out, format=args.format, image_size=args.image_size, input_dtype=args.input_dtype,
                  opset=args.opset, log=print)
    runtime = "OpenVINO" if args.format == "openvino" else "onnxruntime"
    print(f"next: see docs/usage.md to run {path} with {runtime}")
    return 0


def _cmd_import(args) -> int:
    from .config import DEFAULT_WINDOWS
    from .original import import_official_run

    windows = {**DEFAULT_WINDOWS, **dict(args.window or [])}
    path = import_official_run(args.checkpoint, args.out, input_size=args.input_size, out_indices=args.out_indices,
                               heads=args.heads, ref_len=args.ref_len, backbone=args.backbone,
                               backbone_weights=args.backbone_weights, avg_pool=not args.no_avg_pool,
                               trusted=args.trust_checkpoint, windows=windows)
    print(f"imported {args.checkpoint} into {path}\nnext: rlr test --run {path} --data-root DIR")
    return 0


def _cmd_cache(args) -> int:
    import time

    from .features import cache_entries, clear_cache, default_cache_dir, format_size

    where = args.cache_dir or default_cache_dir()
    if args.action == "clear":
        removed = clear_cache(args.cache_dir, args.older_than)
        freed = format_size(sum(e.bytes for e in removed))
        print(f"removed {len(removed)} cache folder(s) ({freed}) from {where}")
        return 0
    if args.older_than is not None:
        raise ConfigError("--older-than applies to `rlr cache clear` only")
    entries = cache_entries(args.cache_dir)
    if not entries:
        print(f"the feature cache in {where} is empty")
        return 0
    now = time.time()
    rows = [(e.folder.name, f"{e.images}", f"{e.shards}", format_size(e.bytes), f"{(now - e.last_used) / 86400:.1f}")
            for e in entries]
    header = ("folder", "images", "shards", "size", "days since use")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    print(f"total {format_size(sum(e.bytes for e in entries))} in {where}")
    return 0


def _cmd_serve(args) -> int:
    from .serve import ServeSettings, serve

    hosts = None if args.allowed_hosts is None else tuple(args.allowed_hosts.split(","))
    settings = ServeSettings(max_batch=args.max_batch, max_queue=args.queue_size, max_file_mb=args.max_file_mb,
                             max_files=args.max_files, max_pixels=args.max_pixels,
                             request_memory_mb=args.request_memory_mb, allowed_hosts=hosts)
    serve(args.run, host=args.host, port=args.port, device=args.device, backend=args.backend,
          precision=args.precision, settings=settings, runtime=args.backbone_runtime)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, epochs=args.epochs, device=args.device, progress=not args.quiet)
    return 0


COMMANDS = {"train": _cmd_train, "test": _cmd_test, "predict": _cmd_predict, "export": _cmd_export,
            "serve": _cmd_serve, "import-official": _cmd_import, "cache": _cmd_cache, "demo": _cmd_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .backbone import BackboneError
    from .data import DatasetError
    from .distributed import rank_label, require_single_process
    from .original import CheckpointError
    from .run import RunError

    args = build_parser().parse_args(argv)
    try:
        if args.command != "train":
            require_single_process(args.command)   # only training runs distributed (torchrun)
        return COMMANDS[args.command](args)
    except (DatasetError, RunError, ConfigError, BackboneError, CheckpointError, FileNotFoundError, ValueError) as err:
        if os.environ.get("RLR_DEBUG"):
            raise
        if not getattr(err, "rlr_quiet", False):   # under torchrun a failure is reported once, by its own rank
            print(f"rlr: error: {rank_label()}{err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlr: interrupted (a run's checkpoint holds its last complete epoch: continue with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
