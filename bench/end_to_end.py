"""End-to-end suite: a training step and inference of both RLR levels, and an epoch on real images.

Methods (the ``backend`` column):

    original        rlr/original.py's OriginalRLR, one per level: the original code's module
                    (nn.MultiheadAttention with dense float masks, reference repeated per sample),
                    with its masks built once and ``need_weights=False``. This is the baseline of
                    ``speedup_vs_original``.
    original-code   the same modules called exactly as the original code calls them: every
                    attention call rebuilds its (L, L) float mask with a Python loop over the grid
                    and leaves ``need_weights`` at its default (True: MHA's math path, which also
                    averages the weights over heads). Slower than "original"; shown so the reader
                    sees that "original" is the conservative baseline.
    rlr-<name>      rlr.model.RLRModel with rlr_kernels backend <name>, every one available here.

Rows:
  - train_step: jitter + forward of both levels + the loss of rlr.train + backward + one Adam step,
    features given as tensors (backbone excluded). Shapes: tf_efficientnet_lite0 at 256 px
    (level 2: 40 ch on 32x32, level 3: 112 ch on 16x16) and the paper's tf_efficientnet_b6
    (72 ch on 32x32, 200 ch on 16x16); both levels share one Adam (the original steps once per
    level: the same arithmetic, see rlr/train.py). The paper's model size, and each training
    recipe's (``RECIPE_STEPS``: its widths, heads, layers and windows at its batch size, on lite0's
    features for the fast recipe and lite2's, 48 / 120 ch, for the wide one).
  - inference: both levels' forward under no_grad in eval mode; ``throughput`` = images/s.
  - epoch (realmini): one training epoch over real images with the lite0 backbone: without a
    feature cache (decode, resize, backbone, step: what the original code does every epoch) and
    with rlr.features' cache (tokens read from the cache; building the cache is its own row).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import rlr_kernels

from .common import Row, Skip, TimingPolicy, error_text, peak_memory_mb, round_row, summarise, time_calls

REALMINI = Path(os.environ.get("RLR_REALMINI", "/work/shared/data/realmini"))

# (name, channels per level): timm's feature_info at out indices (2, 3); grids at 256 px are 32x32, 16x16.
BACKBONE_SHAPES = (("lite0", (40, 112)), ("b6", (72, 200)))
GRIDS = ((32, 32), (16, 16))


@dataclass(frozen=True)
class ModelShape:
    backbone: str
    channels: tuple
    batch: int
    recipe: str = "paper"   # the model's widths, heads, layers and windows: rlr.config.RECIPES

    @property
    def label(self) -> str:
        levels = ", ".join(f"{g[0]}x{g[1]}x{c}" for g, c in zip(GRIDS, self.channels))
        model = "" if self.recipe == "paper" else f" {self.recipe} recipe"
        return f"{self.backbone}{model} B{self.batch} [{levels}]"


def _pipeline():
    """The rlr pipeline modules; a missing piece is a recorded skip, not a crash."""
    try:
        from rlr.config import RLRConfig
        from rlr.model import RLRModel
        from rlr.original import OriginalRLR
        from rlr.train import add_jitter, reconstruction_loss
    except ImportError as err:
        raise Skip(f"the rlr pipeline is not importable ({err})") from None
    return RLRConfig, RLRModel, OriginalRLR, add_jitter, reconstruction_loss


# ------------------------------------------------------------------------------------ models


class _OriginalCodeCall(nn.Module):
    """Wraps one nn.MultiheadAttention of OriginalRLR so that it is called as the original code calls
    it: mask rebuilt on every call, need_weights left at its default. Parameters are the wrapped ones."""

    def __init__(self, attention: nn.MultiheadAttention, side: int, window: int, inside_allowed: bool):
        super().__init__()
        self.attention = attention
        self.side, self.window, self.inside_allowed = side, window, inside_allowed

    def forward(self, query, key, value, attn_mask=None, need_weights=None):
        from rlr.original import loop_window_mask   # the pipeline is imported lazily (see _pipeline)

        mask = loop_window_mask(self.side, self.window, self.inside_allowed, query.device).to(query.dtype)
        return self.attention(query, key, value, attn_mask=mask)


class _OriginalPair(nn.Module):
    """Both levels of the original module at a config's widths, heads, layers and windows, called like
    RLRModel: list of (B, L, C) -> list."""

    def __init__(self, OriginalRLR, config, channels, exact_calls: bool):
        super().__init__()
        self.levels = nn.ModuleList()
        for (h, w), c, d in zip(GRIDS, channels, config.level_d_models()):
            window = config.window_for((h, w))
            level = OriginalRLR(h * w, c, d, heads=config.heads, layers=config.layers, ffn_ratio=config.ffn_ratio,
                                ref_len=config.ref_len, window=window)
            if exact_calls:
                for layer in level.encoder.encode_layers:
                    layer.mca = _OriginalCodeCall(layer.mca, h, window, inside_allowed=True)
                    layer.nsa = _OriginalCodeCall(layer.nsa, h, window, inside_allowed=False)
            self.levels.append(level)

    def forward(self, features):
        return [level(f) for level, f in zip(self.levels, features)]


def e2e_methods(device: torch.device) -> list:
    names = ["original", "original-code"]
    names += [f"rlr-{b}" for b in rlr_kernels.available_backends(device)]
    return names


def build_model(method: str, channels, device: torch.device, recipe: str = "paper"):
    """Both levels as ``method`` computes them, at ``recipe``'s model size."""
    RLRConfig, RLRModel, OriginalRLR, _, _ = _pipeline()
    torch.manual_seed(0)
    if method.startswith("rlr-"):
        config = RLRConfig.from_recipe(recipe, backend=method[len("rlr-"):])
        model = RLRModel(config, list(channels), list(GRIDS))
    else:
        config = RLRConfig.from_recipe(recipe)
        model = _OriginalPair(OriginalRLR, config, channels, exact_calls=(method == "original-code"))
    return model.to(device)


def _precision_context(precision: str, device: torch.device):
    if precision == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------ rows


def _features(shape: ModelShape, device, seed=0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape.batch, h * w, c, generator=g).abs().to(device) for (h, w), c in zip(GRIDS, shape.channels)]


def _new_row(op, mode, shape_label, method, device, precision, batch, tokens=GRIDS[0][0] * GRIDS[0][1]) -> Row:
    return Row(bench="end_to_end", op=op, mode=mode, shape=shape_label, backend=method, device=device.type,
               dtype=precision, batch=batch, tokens=tokens)


def _measure(row: Row, call, device, policy: TimingPolicy, images: int, prepare=None) -> None:
    times, first = time_calls(call, device, policy)
    row.__dict__.update(summarise(times))
    if first is not None:
        row.extra["first_call_s"] = round(first, 4)
    row.throughput = round(images / (row.median_ms / 1e3), 2)
    row.peak_mem_mb = peak_memory_mb(call, device, prepare)


@contextlib.contextmanager
def _recorded(row: Row, device):
    """A Skip or an error becomes the row's status: one failing row never stops the suite."""
    try:
        yield
    except Skip as skip:
        row.status, row.note = "skipped", str(skip)
    except Exception as err:
        row.status, row.note = "error", error_text(err)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def train_step_row(method, shape: ModelShape, device, precision, policy) -> Row:
    row = _new_row("train_step", "train", shape.label, method, device, precision, shape.batch)
    with _recorded(row, device):
        _, _, _, add_jitter, reconstruction_loss = _pipeline()
        model = build_model(method, shape.channels, device, shape.recipe).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        clean = _features(shape, device)
        noise = torch.Generator(device=device).manual_seed(1)

        def step():
            optimizer.zero_grad(set_to_none=True)
            noisy = [add_jitter(f, 4.0, noise) for f in clean]
            with _precision_context(precision, device):
                reconstructions = model(noisy)
            loss = sum(reconstruction_loss(r, f) for r, f in zip(reconstructions, clean))
            loss.backward()
            optimizer.step()

        _measure(row, step, device, policy, shape.batch, prepare=lambda: optimizer.zero_grad(set_to_none=True))
        row.note = "features given as tensors (backbone excluded); images/s in throughput"
    round_row(row)
    return row


def inference_row(method, shape: ModelShape, device, precision, policy) -> Row:
    row = _new_row("inference", "infer", shape.label, method, device, precision, shape.batch)
    with _recorded(row, device):
        model = build_model(method, shape.channels, device).eval()
        features = _features(shape, device)

        def infer():
            with torch.no_grad(), _precision_context(precision, device):
                return model(features)

        _measure(row, infer, device, policy, shape.batch)
        row.note = "both levels' forward, features given (backbone excluded); images/s in throughput"
    round_row(row)
    return row


# ------------------------------------------------------------------------------------ epoch


def _realmini_samples(limit: Optional[int]):
    if not REALMINI.is_dir():
        raise Skip(f"{REALMINI} not found (set RLR_REALMINI to an MVTec-layout folder)")
    try:
        from rlr.data import load_dataset
        from rlr.train import training_samples
    except ImportError as err:
        raise Skip(f"the rlr pipeline is not importable ({err})") from None
    samples, _ = training_samples(load_dataset(REALMINI))   # every normal image, none held out
    if limit is not None and limit < len(samples):
        # An even spread over the classes (samples are grouped class by class).
        step = len(samples) / limit
        samples = [samples[int(i * step)] for i in range(limit)]
    return samples


def epoch_rows(device, quick: bool, policy: TimingPolicy, log=print, batch_size: int = 4) -> list:
    """One epoch of training on realmini: original pipeline (no cache) vs rlr with and without cache."""
    limit = 16 if (quick and device.type == "cpu") else None
    backends = rlr_kernels.available_backends(device)
    best = next((b for b in dispatch_preference(device) if b in backends), "reference")
    rows = []
    try:
        samples = _realmini_samples(limit)
        from rlr.backbone import create_backbone
        from rlr.data import load_image
        from rlr.features import FeatureCache
        extractor = create_backbone("tf_efficientnet_lite0", input_size=256).to(device)
    except Skip as skip:
        row = _new_row("epoch", "train", "realmini", "all", device, "float32", batch_size)
        row.status, row.note = "skipped", str(skip)
        return [row]
    except Exception as err:
        row = _new_row("epoch", "train", "realmini", "all", device, "float32", batch_size)
        row.status, row.note = "error", error_text(err)
        return [row]

    label = f"realmini {len(samples)} images, lite0 256px, B{batch_size}"
    _, _, _, add_jitter, reconstruction_loss = _pipeline()
    channels = tuple(extractor.channels)
    steps = math.ceil(len(samples) / batch_size)
    cache_root = Path(tempfile.mkdtemp(prefix="rlr-bench-cache-"))
    repeats = 1 if (quick and device.type == "cpu") else 2

    def train_epoch(model, optimizer, batch_tokens, steps=steps):
        noise = torch.Generator(device=device).manual_seed(1)
        for step in range(steps):
            clean = batch_tokens(step)
            noisy = [add_jitter(f, 4.0, noise) for f in clean]
            loss = sum(reconstruction_loss(r, f) for r, f in zip(model(noisy), clean))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def from_images(step):   # the original pipeline: decode + resize + backbone, every epoch
        chunk = samples[step * batch_size:(step + 1) * batch_size]
        images = extractor.preprocess([load_image(s.path) for s in chunk]).to(device)
        return [t.float() for t in extractor(images)]

    def run(method, use_cache, table=None):
        name = f"{method} ({'cache' if use_cache else 'no cache'})"   # "original (no cache)" is the baseline
        row = _new_row("epoch", "train", label, name, device, "float32", batch_size)
        try:
            model = build_model(method, channels, device).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
            if use_cache:
                def batch_tokens(step):
                    index = range(step * batch_size, min((step + 1) * batch_size, len(samples)))
                    return table.tensors(index, device=device)
            else:
                batch_tokens = from_images
            train_epoch(model, optimizer, batch_tokens, steps=1)   # warm-up step (allocator, Adam state, lazy loads)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                train_epoch(model, optimizer, batch_tokens)
                times.append(time.perf_counter() - start)
            row.__dict__.update(summarise(times))
            row.throughput = round(len(samples) / (row.median_ms / 1e3), 2)
            row.note = f"{steps} steps; wall time of whole epochs after one warm-up step"
        except Exception as err:
            row.status, row.note = "error", error_text(err)
        round_row(row)
        log(_describe(row))
        return row

    try:
        rows.append(run("original", use_cache=False))
        rows.append(run(f"rlr-{best}", use_cache=False))
        build = _new_row("epoch", "cache-build", label, "rlr feature cache", device, "float32", batch_size)
        try:
            start = time.perf_counter()
            cache = FeatureCache(extractor, str(cache_root), device=device, progress=False)
            table = cache.features([s.path for s in samples], "bench")
            build.__dict__.update(summarise([time.perf_counter() - start]))
            build.throughput = round(len(samples) / (build.median_ms / 1e3), 2)
            build.note = "one-off: decode + resize + backbone + write float16 shards (paid once per image)"
            round_row(build)
            rows.append(build)
            log(_describe(build))
            rows.append(run(f"rlr-{best}", use_cache=True, table=table))
        except Exception as err:
            build.status, build.note = "error", error_text(err)
            rows.append(build)
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    return rows


def dispatch_preference(device: torch.device) -> tuple:
    from rlr_kernels import dispatch
    return dispatch.PREFERENCE.get(device.type, ("reference",))


# ------------------------------------------------------------------------------------ suite


def model_shapes(quick: bool, device: torch.device, op: str) -> list:
    """Training at the paper's batch 4 (and 16 in a full or GPU run); inference at batch 16.

    A quick CPU run times inference for lite0 only: the backbones' shapes differ only in the
    channels C of the embedding and output projection, a small part of the cost.
    """
    quick_cpu = quick and device.type == "cpu"
    if op == "train_step":
        batches = (4,) if quick_cpu else (4, 16)
        backbones = BACKBONE_SHAPES
    else:
        batches = (16,)
        backbones = BACKBONE_SHAPES[:1] if quick_cpu else BACKBONE_SHAPES
    shapes = [ModelShape(name, channels, b) for name, channels in backbones for b in batches]
    if op == "train_step":   # the training recipes' own models at their batch, on the backbone they train with
        from rlr.config import RECIPES
        shapes += [ModelShape(name, RECIPE_BACKBONE_CHANNELS[name], RECIPES[r]["batch_size"], r)
                   for r, name in RECIPE_STEPS.items()]
    return shapes


# Recipes whose training step is timed at their own model size (the paper's is the rows above), on the features
# of the backbone each trains on by default (the fast recipe: the offline lite0 the README trains it with).
RECIPE_STEPS = {"fast": "lite0", "wide": "lite2"}
RECIPE_BACKBONE_CHANNELS = dict(BACKBONE_SHAPES, lite2=(48, 120))


def _cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: there bf16 matmuls run several times faster than fp32 (oneDNN)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def precisions(device: torch.device) -> tuple:
    if device.type == "cuda" or _cpu_has_fast_bf16():
        return ("float32", "bf16-autocast")
    return ("float32",)


def _quick_skip_reason(method: str, shape: ModelShape, op: str) -> Optional[str]:
    """A quick CPU run keeps the comparison (original vs our fused backends) and drops the rest."""
    if method == "rlr-reference":
        return "quick CPU run: the dense reference backend is compared in the kernel suite"
    if method == "original-code" and (op != "train_step" or shape.backbone != BACKBONE_SHAPES[0][0]
                                      or shape.recipe != "paper"):
        return f"quick CPU run: original-code is timed for the {BACKBONE_SHAPES[0][0]} training step only"
    return None


def run_end_to_end(device: torch.device, quick: bool, policy: TimingPolicy, log=print,
                   with_epoch: bool = True) -> list:
    rows = []
    for precision in precisions(device):
        for op, fn in (("train_step", train_step_row), ("inference", inference_row)):
            for shape in model_shapes(quick, device, op):
                for method in e2e_methods(device):
                    reason = _quick_skip_reason(method, shape, op) if (quick and device.type == "cpu") else None
                    if reason:
                        row = _new_row(op, "train" if op == "train_step" else "infer", shape.label, method, device,
                                       precision, shape.batch)
                        row.status, row.note = "skipped", reason
                    else:
                        row = fn(method, shape, device, precision, policy)
                    rows.append(row)
                    log(_describe(row))
    if with_epoch:
        rows += epoch_rows(device, quick, policy, log)
    return rows


def _describe(row: Row) -> str:
    head = f"[end_to_end] {row.dtype} {row.op:10s} {row.shape:40s} {row.backend:24s}"
    if row.status != "ok":
        return f"{head} {row.status}: {row.note}"
    mem = f"{row.peak_mem_mb:9.1f} MiB" if row.peak_mem_mb is not None else ""
    return f"{head} {row.median_ms:10.2f} ms  {row.throughput:8.2f} img/s (n={row.repeats}) {mem}"
