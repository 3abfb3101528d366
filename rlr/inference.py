"""Loading a trained run and scoring images with it: the one home of inference (DESIGN.md §2, §4).

    det = rlr.load("runs/mvtec")                    # a Detector: model, backbone, the run's threshold
    result = det.predict("image.png")               # .score .label .normalized_score .anomaly_map
    results = det.predict("folder/")                # a list, one per image

Scoring: per level, token score s_t = mean_c (f - f_hat)^2 + 1 - cos(f_t, f_hat_t); the h x w score
grid is upsampled bilinearly (align_corners=True) to the input size and the levels are averaged:
the anomaly map on which the pixel metrics are computed (a run trained with ``--scoring standardized``
first standardises each level's token scores by statistics of normal images, ``--scoring log-standardized`` their
logarithms: :func:`combine_levels`). The image score is the maximum of that
map after a Gaussian blur with sigma 4 (scipy's gaussian_filter, as the original code: its kernel, truncation
and "reflect" border, computed as two matrix products, :class:`GaussianBlur`).

Nothing here imports the trainer (rlr.train) or rlr.distributed: a deployed run needs neither.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import threshold as thresholds
from .config import STANDARDIZING_SCORINGS
from .backbone import FeatureExtractor, check_runtime, create_backbone, decode_ahead, resize_image
from .data import IMAGE_EXTENSIONS, DatasetError, find_images
from .model import RLRModel, inference_copy
from .run import RunError, TrainedRun, load_run

BLUR_SIGMA = 4.0
BLUR_TRUNCATE = 4.0   # scipy's default: the kernel reaches int(4 * sigma + 0.5) pixels each side
INFERENCE_PRECISIONS = ("fp32", "bf16", "fp16")


# ---------------------------------------------------------------------------------------------- device and precision

def resolve_device(device: Optional[str] = None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available; use --device cpu")
    return device


def _cpu_probe(name: str) -> bool:
    # private probes of torch.cpu; a torch without them counts as "not native" (fp32 is the safe choice)
    probe = getattr(torch.cpu, name, None)
    return probe is not None and bool(probe())


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware: a CUDA GPU with bf16, or a CPU with AMX or
    AVX512-BF16. Elsewhere bf16 autocast is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_probe("_is_amx_tile_supported") or _cpu_probe("_is_avx512_bf16_supported")
    return False


def fp16_is_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies fp16 in hardware: any CUDA GPU, or a CPU with AMX-FP16 or AVX512-FP16."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return _cpu_probe("_is_amx_fp16_supported") or _cpu_probe("_is_avx512_fp16_supported")
    return False


def precision_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The compute dtype of an inference ``precision`` (None for fp32); an error where the hardware lacks it."""
    if precision not in INFERENCE_PRECISIONS:
        raise ValueError(f"precision must be one of {INFERENCE_PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    native = bf16_is_native if precision == "bf16" else fp16_is_native
    if not native(device):
        needs = ("a CUDA GPU with bf16, or a CPU with AMX or AVX512-BF16" if precision == "bf16"
                 else "a CUDA GPU, or a CPU with AMX-FP16 or AVX512-FP16")
        raise ValueError(f"precision {precision} needs {needs}; this {device.type} device has none "
                         f"(use --precision fp32)")
    return torch.bfloat16 if precision == "bf16" else torch.float16


# ---------------------------------------------------------------------------------------------- scoring

def token_scores(features: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """One level's token scores (B, L) float32: mean_c (f - f_hat)^2 + 1 - cos(f, f_hat)."""
    f, r = features.float(), reconstruction.float()
    return ((f - r) ** 2).mean(dim=-1) + 1 - F.cosine_similarity(f, r, dim=-1)


# Token scores are positive (a squared error plus 1 - cos); the floor only keeps an exact reconstruction's log finite.
LOG_FLOOR = 1e-12


def scoring_space(score: torch.Tensor, scoring: str) -> torch.Tensor:
    """One level's token scores (B, L) as ``scoring`` standardises them: log(s) under "log-standardized", else s."""
    return torch.log(score.clamp_min(LOG_FLOOR)) if scoring == "log-standardized" else score


def check_scoring(scoring: str, level_stats: Optional[Sequence[tuple]], levels: int) -> None:
    """A scoring and its statistics belong together: (mean, std) per level for the standardising ones, none for
    "paper"."""
    if scoring == "paper":
        if level_stats is not None:
            raise ValueError("the paper's scoring takes no level statistics; pass scoring='standardized' or "
                             "'log-standardized' with them")
    elif scoring in STANDARDIZING_SCORINGS:
        if level_stats is None or len(level_stats) != levels:
            raise ValueError(f"scoring {scoring!r} needs one (mean, std) per level ({levels}), got {level_stats!r}")
    else:
        raise ValueError(f"unknown scoring {scoring!r}; expected 'paper' or one of {STANDARDIZING_SCORINGS}")


def combine_levels(scores: Sequence[torch.Tensor], grids: Sequence[tuple], size: int,
                   level_stats: Optional[Sequence[tuple]] = None, scoring: str = "paper") -> torch.Tensor:
    """Per-pixel anomaly maps (B, size, size) float32 from each level's token scores (B, L).

    ``scoring`` "paper" (no ``level_stats``): the paper's plain mean of the levels. "standardized": with one
    (mean, std) per level, each level's token scores become (s - mean) / std before the mean, which commutes
    with the bilinear upsampling (its weights sum to 1). "log-standardized": the same on log(s), with statistics
    of log(s); the mean of the levels is then a weighted geometric mean of their scores (up to a monotone
    map), so a squared error's long tail on one level does not outvote the other level.
    """
    check_scoring(scoring, level_stats, len(scores))
    total = None
    for level, (score, (h, w)) in enumerate(zip(scores, grids)):
        if level_stats is not None:
            mean, std = level_stats[level]
            score = (scoring_space(score, scoring) - mean) / std
        score = F.interpolate(score.view(-1, 1, h, w), size=(size, size), mode="bilinear", align_corners=True)
        total = score if total is None else total + score
    return (total / len(scores)).squeeze(1)


def anomaly_maps(features: Sequence[torch.Tensor], reconstructions: Sequence[torch.Tensor], grids: Sequence[tuple],
                 size: int, level_stats: Optional[Sequence[tuple]] = None, scoring: str = "paper") -> torch.Tensor:
    """Per-pixel anomaly maps (B, size, size) float32 from each level's tokens and reconstruction
    (:func:`combine_levels` of their :func:`token_scores`)."""
    return combine_levels([token_scores(f, r) for f, r in zip(features, reconstructions)], grids, size, level_stats,
                          scoring)


def score_statistics(score_batches, scoring: str = "standardized") -> list:
    """(mean, std) of each level's token scores, in ``scoring``'s space (:func:`scoring_space`), over batches of
    per-level scores (each (B, L)): a standardising scoring's statistics. Float64 sums, so the figures do not
    depend on how the images are batched."""
    if scoring not in STANDARDIZING_SCORINGS:
        raise ValueError(f"scoring {scoring!r} takes no statistics; the standardising ones are "
                         f"{STANDARDIZING_SCORINGS}")
    sums = None
    for scores in score_batches:
        values = [scoring_space(s.double(), scoring) for s in scores]
        batch = [(x.numel(), float(x.sum()), float(x.square().sum())) for x in values]
        sums = batch if sums is None else [tuple(x + y for x, y in zip(a, b)) for a, b in zip(sums, batch)]
    if sums is None:
        raise ValueError("the scoring statistics need at least one normal image")
    stats = []
    for count, total, squares in sums:
        mean = total / count
        std = max(squares / count - mean * mean, 0.0) ** 0.5
        if not std > 0:
            raise ValueError(f"a level's token scores have no spread over {int(count)} tokens (std {std}): "
                             f"they cannot be standardised")
        stats.append((mean, std))
    return stats


@torch.no_grad()
def level_statistics(model: RLRModel, token_batches, device=None, scoring: str = "standardized") -> list:
    """:func:`score_statistics` of a model's token scores on batches of per-level tokens (each (B, L, C)),
    scored in fp32."""
    def scores():
        for tokens in token_batches:
            tokens = [t.to(device or t.device, torch.float32) for t in tokens]
            yield [token_scores(t, r) for t, r in zip(tokens, model(tokens))]
    return score_statistics(scores(), scoring)


def gaussian_kernel(sigma: float = BLUR_SIGMA, truncate: float = BLUR_TRUNCATE) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-D kernel: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / sigma ** 2 * x ** 2)
    return phi / phi.sum()


def reflect_index(size: int, radius: int) -> np.ndarray:
    """Indices that pad an axis of ``size`` by ``radius`` each side in scipy's "reflect" mode (d c b a | a b c d)."""
    index = np.mod(np.arange(-radius, size + radius), 2 * size)
    return np.where(index >= size, 2 * size - 1 - index, index)


@functools.lru_cache(maxsize=8)
def blur_matrix(size: int, sigma: float = BLUR_SIGMA, truncate: float = BLUR_TRUNCATE) -> torch.Tensor:
    """(size, size) float32 G such that G @ column is scipy's 1-D Gaussian filter of the column, its "reflect"
    border folded in: row i holds the kernel's taps at the (reflected) positions i - r .. i + r."""
    kernel = gaussian_kernel(sigma, truncate)
    radius = (len(kernel) - 1) // 2
    index = reflect_index(size, radius)
    matrix = np.zeros((size, size), dtype=np.float64)
    for i in range(size):
        np.add.at(matrix[i], index[i:i + len(kernel)], kernel)
    return torch.from_numpy(matrix).float()


class GaussianBlur(nn.Module):
    """rlr's image-score blur of (N, H, W) maps: scipy's gaussian_filter (sigma 4, truncation 4, "reflect" border)
    as G_H @ map @ G_W^T (:func:`blur_matrix`). Two small matrix products run several times faster than
    scipy's loop or a 33-tap convolution of one-channel maps, and are standard operators for the exported
    graph. Equal to scipy's result within float32 rounding (about 5e-7 relative: scipy sums in float64)."""

    def __init__(self, size: int):
        super().__init__()
        self.register_buffer("matrix", blur_matrix(int(size)).clone(), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return separable_blur(maps, self.matrix, self.matrix)


def separable_blur(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ map @ cols^T for each map of (B, H, W): the blur along H, then along W."""
    return torch.matmul(torch.matmul(rows, maps), cols.T)


def blur(maps: np.ndarray, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Gaussian blur of each (H, W) map of (B, H, W) (scipy's gaussian_filter: mode "reflect", truncate 4)."""
    if not len(maps):
        return maps
    height, width = maps.shape[-2:]
    return separable_blur(torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)),
                          blur_matrix(height, sigma), blur_matrix(width, sigma)).numpy()


def image_scores(maps: np.ndarray) -> np.ndarray:
    """Image score = max of the blurred map, (B, S, S) -> (B,)."""
    return blur(maps).reshape(len(maps), -1).max(axis=1) if len(maps) else np.zeros(0, np.float32)


class Scorer:
    """Anomaly maps of a trained model for images or cached tokens, in fp32, bf16 or fp16.

    The backbone runs rlr.backbone's "fast" runtime (weights in the precision's type). The RLR levels run
    :func:`rlr.model.inference_copy` of the model, made on first use (a snapshot: a model trained on
    afterwards needs a new Scorer): its weights in the precision's type, so 16-bit inference has none
    of autocast's casting of every activation and weight on every call, and its linear layers are one
    oneDNN call each, the FFN's GELU fused in (levels 1.2x faster in bf16, 1.06x in fp32: docs/usage.md). LayerNorm
    and the softmax accumulate in float32 inside their kernels in every precision; token scores are
    computed in float32 from the float32 tokens."""

    def __init__(self, model: RLRModel, extractor: FeatureExtractor, device, precision: str = "fp32",
                 level_stats: Optional[Sequence[tuple]] = None, scoring: str = "paper"):
        check_scoring(scoring, level_stats, len(model.grids))
        self.model, self.extractor, self.device = model.eval(), extractor, torch.device(device)
        self.precision, self.level_stats, self.scoring = precision, level_stats, scoring
        self._dtype = precision_dtype(precision, self.device)   # None: float32
        self._levels = None   # the inference copy of the model, made on first use

    def _network(self) -> RLRModel:
        if self._levels is None:
            self._levels = inference_copy(self.model, self.device, self._dtype or torch.float32)
        return self._levels

    @torch.no_grad()
    def level_scores(self, tokens: Sequence[torch.Tensor]) -> list:
        """Cached or fresh tokens per level -> each level's token scores (B, L) float32."""
        tokens = [t.to(self.device, torch.float32) for t in tokens]
        network = self._network()
        reconstructions = network(tokens if self._dtype is None else [t.to(self._dtype) for t in tokens])
        return [token_scores(t, r) for t, r in zip(tokens, reconstructions)]

    def maps_from_scores(self, scores: Sequence[torch.Tensor]) -> np.ndarray:
        return combine_levels(scores, self.model.grids, self.extractor.input_size, self.level_stats,
                              self.scoring).cpu().numpy()

    def maps_from_tokens(self, tokens: Sequence[torch.Tensor]) -> np.ndarray:
        return self.maps_from_scores(self.level_scores(tokens))

    @torch.no_grad()
    def tokens_from_images(self, images: Sequence[np.ndarray]) -> list:
        """uint8 (H, W, 3) images -> float32 tokens per level (the backbone computes in the precision's
        type: rlr.backbone's "fast" runtime holds its weights in it, the "eager" one autocasts).

        Not rounded to float16 as the feature cache stores them: that rounding turns last-bit
        differences of the backbone (another batch size, another runtime) into steps of up to 6e-4,
        so images would score differently by batch and the exported graph could not match. Scores
        from the cache (`rlr test`) differ from these by about 1e-4 relative."""
        batch = self.extractor.preprocess(images).to(self.device)
        return self.extractor(batch, dtype=self._dtype)

    def maps_from_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 (H, W, 3) images -> maps (B, S, S)."""
        return self.maps_from_tokens(self.tokens_from_images(images))


def open_run(run_dir, device=None, backend: Optional[str] = None, runtime: str = "fast") -> tuple:
    """(TrainedRun, FeatureExtractor, device) for inference, checking the backbone weights. ``runtime``:
    how the backbone runs (rlr.backbone: "fast", or "eager" for debugging)."""
    device = resolve_device(device)
    check_runtime(runtime)
    run = load_run(run_dir, device, backend)
    config = run.config
    extractor = create_backbone(config.backbone, config.backbone_weights, config.out_indices,
                                config.input_size, config.avg_pool, runtime).to(device)
    expected = run.checkpoint.get("backbone_weights_sha256")
    if expected is not None and expected != extractor.weights_id:
        raise RunError(f"the backbone weights found now for {config.backbone} differ from those the run in "
                       f"{run_dir} was trained with (sha256 {expected[:12]}... vs {extractor.weights_id[:12]}...)")
    if [tuple(g) for g in extractor.grids] != run.model.grids or list(extractor.channels) != run.model.channels:
        raise RunError(f"backbone {config.backbone} gives levels {extractor.channels} channels on grids "
                       f"{extractor.grids}, the run's model expects {run.model.channels} on {run.model.grids}")
    return run, extractor, device


# ---------------------------------------------------------------------------------------------- the detector API

@dataclass
class Prediction:
    """One image's result. ``anomaly_map`` is the blurred map (its max is ``score``), float32 (H, W).

    ``label`` is 1 (anomalous: score >= threshold), 0, or None when there is no threshold;
    ``normalized_score`` in [0, 1] is 0.5 at the threshold (None without one).
    """

    score: float
    label: Optional[int]
    normalized_score: Optional[float]
    anomaly_map: np.ndarray
    threshold: Optional[float] = None
    path: Optional[str] = None

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


def collect_images(inputs: Sequence, skip: Sequence = (), relative: bool = False) -> list:
    """Image files from files and folders: a folder's images with its subfolders', sorted (rlr.data.find_images;
    ``skip``: folders left out, e.g. outputs inside an input). With ``relative``, (path, name) pairs: a
    folder's images named by their path relative to it, a file by its path as given."""
    found = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            below = find_images(item, skip)
            if not below:
                raise DatasetError(f"folder {item} holds no image files ({', '.join(IMAGE_EXTENSIONS)}), "
                                   f"subfolders included")
            found.extend(below)
        elif item.is_file():
            found.append((str(item), str(item)))
        else:
            raise DatasetError(f"{item} does not exist (expected an image file or a folder of images)")
    return found if relative else [path for path, _ in found]


def _as_images(x) -> tuple:
    """``predict``'s input -> (list of uint8 (H, W, 3) arrays or paths, whether one image was given)."""
    if isinstance(x, (str, os.PathLike)):
        path = Path(x)
        return (collect_images([path]), False) if path.is_dir() else ([str(path)], True)
    if isinstance(x, torch.Tensor):
        if x.dim() == 3:
            x, single = x.unsqueeze(0), True
        else:
            single = False
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"a tensor input must be (N, 3, H, W) RGB, got shape {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            array = x
        elif x.is_floating_point():
            if x.numel() and (x.min() < 0 or x.max() > 1 or not torch.isfinite(x).all()):
                raise ValueError("a float tensor input must hold RGB values in [0, 1]")
            array = (x.float() * 255).round()   # the uint8 every image file decodes to
        else:
            raise ValueError(f"a tensor input must be float in [0, 1] or uint8, got {x.dtype}")
        images = array.to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()
        return list(images), single
    if isinstance(x, np.ndarray):
        if x.ndim == 3 and x.shape[2] == 3 and x.dtype == np.uint8:
            return [x], True
        raise ValueError(f"an array input must be an (H, W, 3) uint8 RGB image, got shape {x.shape} {x.dtype}")
    try:
        from PIL import Image
    except ImportError:   # pragma: no cover - PIL is a dependency
        Image = None
    if Image is not None and isinstance(x, Image.Image):
        return [np.asarray(x.convert("RGB"))], True
    if isinstance(x, (list, tuple)):
        items = []
        for item in x:
            items.extend(_as_images(item)[0])
        return items, False
    raise TypeError(f"predict takes a path, a folder, a PIL image, an (H, W, 3) uint8 array, an (N, 3, H, W) "
                    f"tensor or a list of these; got {type(x).__name__}")


def resize_map(heat: np.ndarray, shape: tuple) -> np.ndarray:
    """A (S, S) map bilinearly resized to an image's (H, W) (pixel centres aligned), keeping its peak.

    Resampling lowers a maximum that falls between the new pixel centres, so the pixel nearest the peak
    takes the peak's value: the map's max stays the image score, and ``map >= threshold`` (a mask) is
    empty exactly when the label is 0."""
    if heat.shape == tuple(shape):
        return heat
    tensor = torch.from_numpy(np.ascontiguousarray(heat, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    target = tuple(min(int((i + 0.5) * n / m), n - 1) for i, m, n in zip((row, col), heat.shape, shape))
    resized[target] = max(resized[target], np.float32(heat[row, col]))
    return resized


class Detector:
    """A trained run ready to score images (``rlr.load``). Batching is internal."""

    def __init__(self, run: TrainedRun, extractor: FeatureExtractor, device: torch.device, precision: str = "fp32",
                 threshold: Optional[thresholds.Threshold] = None, batch_size: int = 16):
        self.run, self.extractor, self.device = run, extractor, device
        self.scorer = Scorer(run.model, extractor, device, precision, run.level_stats, run.config.scoring)
        self.threshold = threshold
        self.batch_size = batch_size

    @property
    def config(self):
        return self.run.config

    @property
    def input_size(self) -> int:
        return self.extractor.input_size

    def cut(self, class_name: Optional[str] = None) -> Optional[thresholds.Cut]:
        return None if self.threshold is None else self.threshold.cut(class_name)

    def score_images(self, images: Sequence[np.ndarray]) -> tuple:
        """uint8 images -> (scores (B,), blurred maps (B, S, S)) at the model's resolution."""
        resized = [resize_image(im, self.input_size) for im in images]
        blurred = blur(self.scorer.maps_from_images(resized))
        return blurred.reshape(len(blurred), -1).max(axis=1), blurred

    def result(self, score: float, heat: np.ndarray, cut: Optional[thresholds.Cut], path=None) -> Prediction:
        if cut is None:
            return Prediction(float(score), None, None, heat, None, path)
        return Prediction(float(score), int(score >= cut.threshold), cut.normalize(float(score)), heat, cut.threshold,
                          path)

    def predict(self, x, *, class_name: Optional[str] = None, map_size: str = "input"):
        """Score ``x``: a path, a folder, a PIL image, an (H, W, 3) uint8 array, an (N, 3, H, W) tensor (float
        RGB in [0, 1] or uint8), or a list of these. One :class:`Prediction` for one image, else a list.

        ``class_name`` picks the run's threshold for that class (default: the global one);
        ``map_size`` "input" (the map at each image's own size) or "model" (input_size x input_size).
        """
        if map_size not in ("input", "model"):
            raise ValueError(f"map_size must be 'input' or 'model', got {map_size!r}")
        items, single = _as_images(x)
        if not items:
            raise DatasetError("no input images given")
        cut = self.cut(class_name)
        results = []
        # files are decoded and every image resized in a thread pool, one batch ahead of the scoring
        batches = decode_ahead(items, self.input_size, self.batch_size)
        for start, pending in zip(range(0, len(items), self.batch_size), batches):
            decoded = [future.result() for future in pending]
            scores, maps = self.score_images([image for image, _ in decoded])
            for item, (_, shape), score, heat in zip(items[start:start + self.batch_size], decoded, scores, maps):
                if map_size == "input":
                    heat = resize_map(heat, shape)
                results.append(self.result(score, heat, cut, item if isinstance(item, str) else None))
        return results[0] if single and len(results) == 1 else results


def load(run_dir, device=None, precision: str = "fp32", *, threshold: Optional[float] = None,
         backend: Optional[str] = None, batch_size: int = 16, runtime: str = "fast") -> Detector:
    """Load a trained run folder for inference.

    ``precision`` "fp32" (default), "bf16" or "fp16" (the backbone's and the RLR levels' weights in that
    type; an error where the hardware lacks it); ``threshold`` overrides the run's stored one
    (a run without one gives labels None); ``runtime`` how the backbone runs: "fast" (default: BatchNorm
    folded into the convolutions, channels-last) or "eager" (timm's module as built, for debugging).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of images, got {batch_size!r}")
    device = resolve_device(device)
    precision_dtype(precision, device)   # fail before loading anything
    run, extractor, device = open_run(run_dir, device, backend, runtime)
    stored = thresholds.Threshold.fixed(threshold) if threshold is not None else thresholds.load(run.folder)
    return Detector(run, extractor, device, precision, stored, batch_size)


__all__ = ["Detector", "Prediction", "Scorer", "anomaly_maps", "precision_dtype", "blur", "collect_images",
           "combine_levels", "image_scores", "level_statistics", "load", "open_run", "resolve_device",
           "score_statistics", "scoring_space", "token_scores"]
