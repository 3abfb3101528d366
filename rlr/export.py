"""``rlr export``: a trained run as ONE ONNX graph, image batch -> (score, anomaly map) (DESIGN.md §4).

    image (N, 3, H, W) uint8 RGB (or float32 in [0, 1])        N dynamic, H x W fixed at export
      -> Lanczos resize to S x S, exactly as rlr's PIL resize (Pillow's fixed-point coefficients as two
         constant float64 matrices, each pass stored as uint8 and the passes in Pillow's order, checked
         bit for bit against the installed Pillow at export), / 255, ImageNet mean/std
      -> backbone, 3x3 average pool, float32 tokens (as rlr.load and rlr predict score images)
      -> both RLR levels, the two attention ops in standard operators:
           local reference attention: a gather of each query's k x k window of the (constant)
             reference keys/values: k^2 keys per query, not L;
           masked learnable-key attention: dense attention with an additive -inf mask built in the
             graph from two small band matrices (h x h and w x w), not stored as an L x L table
      -> per-level scores (standardised by the run's statistics, or their logarithms so, under --scoring
         standardized / log-standardized), bilinear
         upsampling (align_corners), level mean (rlr.inference.anomaly_maps, traced)
      -> Gaussian blur sigma 4 (scipy's kernel, truncation and "reflect" border as two S x S matrix products,
         rlr.inference.GaussianBlur)
    outputs: "score" (N,) = max of the blurred map, "anomaly_map" (N, S, S) = the blurred map

The file's metadata carries the run's threshold (``rlr.threshold``, rlr.threshold's JSON), its
config (``rlr.config``) and what the input must be (``rlr.input``). Scores and maps equal
``rlr predict``'s (tests/test_export.py; measured figures in docs/usage.md).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from . import threshold as thresholds
from .atomic import atomic_write_bytes
from .backbone import IMAGENET_MEAN, IMAGENET_STD
from .inference import GaussianBlur, anomaly_maps, check_scoring, open_run
from .run import RunError

FORMATS = ("onnx", "openvino")
MIN_OPSET = 18   # torch's ONNX exporter (torch.export based) writes opset 18 and later
INPUT_DTYPES = ("uint8", "float32")
SCORE_OUTPUT, MAP_OUTPUT, INPUT_NAME = "score", "anomaly_map", "image"


class ExportError(ValueError):
    """A run cannot be exported as asked; the message says why."""


# ---------------------------------------------------------------------------------------------- the two attention ops

def _window_table(height: int, width: int, window: int) -> tuple:
    """(index (L, k*k) int64, bias (L, k*k) float32): each token's window positions, -inf where the window leaves
    the grid (border windows are truncated, DESIGN.md §2; the clamped index there is never weighted)."""
    half = window // 2
    offsets = torch.arange(-half, half + 1)
    rows = torch.arange(height)[:, None, None, None] + offsets[None, None, :, None]   # (h, 1, k, 1)
    cols = torch.arange(width)[None, :, None, None] + offsets[None, None, None, :]    # (1, w, 1, k)
    rows, cols = torch.broadcast_tensors(rows, cols)                                  # (h, w, k, k)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    index = (rows.clamp(0, height - 1) * width + cols.clamp(0, width - 1)).reshape(height * width, -1)
    bias = torch.zeros(inside.shape).masked_fill(~inside, float("-inf")).reshape(height * width, -1)
    return index, bias


class WindowedAttention(nn.Module):
    """rlr_kernels' two ops (DESIGN.md §3) in standard operators, for one level's grid and window."""

    def __init__(self, grid: tuple, window: int):
        super().__init__()
        height, width = grid
        index, bias = _window_table(height, width, window)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("window_bias", bias, persistent=False)
        half = window // 2
        # Band matrices: |row_i - row_j| <= k//2 and |col_i - col_j| <= k//2; the L x L mask is their product.
        self.register_buffer("row_band", (torch.arange(height)[:, None] - torch.arange(height)).abs().le(half).float(),
                             persistent=False)
        self.register_buffer("col_band", (torch.arange(width)[:, None] - torch.arange(width)).abs().le(half).float(),
                             persistent=False)
        self.grid = (height, width)

    def local(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, H, L, d); k, v (R, H, L, d) -> (B, H, L, d): softmax over each query's window, summed over copies."""
        scale = 1.0 / math.sqrt(q.shape[-1])
        keys = k[:, :, self.index]      # (R, H, L, k*k, d)
        values = v[:, :, self.index]
        scores = torch.matmul(q.unsqueeze(1).unsqueeze(-2), keys.transpose(-1, -2).unsqueeze(0)) * scale
        probs = torch.softmax(scores + self.window_bias.unsqueeze(-2), dim=-1)   # (B, R, H, L, 1, k*k)
        return torch.matmul(probs, values.unsqueeze(0)).squeeze(-2).sum(dim=1)

    def masked(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, H, L, d); k (H, L, d); v (B, H, L, d) -> (B, H, L, d): every key outside the query's window."""
        height, width = self.grid
        length = height * width
        inside = (self.row_band.view(height, 1, height, 1) * self.col_band.view(1, width, 1, width)).reshape(length, length)
        bias = torch.where(inside > 0, float("-inf"), 0.0)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        return torch.matmul(torch.softmax(scores + bias, dim=-1), v)


# ---------------------------------------------------------------------------------------------- resize and blur

PIL_PRECISION_BITS = 22   # Pillow's fixed-point coefficients for 8-bit images: 32 - 8 - 2 bits


def _lanczos(x: float) -> float:
    def sinc(t):
        return 1.0 if t == 0 else math.sin(math.pi * t) / (math.pi * t)

    return sinc(x) * sinc(x / 3) if -3 <= x < 3 else 0.0


def lanczos_matrix(source: int, target: int) -> Tensor:
    """(target, source) float64 of integers: Pillow's Lanczos resize of 8-bit images along one axis, its
    fixed-point coefficients exactly (Pillow's precompute_coeffs and normalize_coeffs_8bpc, in Python)."""
    scale = source / target
    filterscale = max(scale, 1.0)
    support = 3.0 * filterscale
    matrix = np.zeros((target, source), dtype=np.float64)
    for out in range(target):
        center = (out + 0.5) * scale
        low = max(int(center - support + 0.5), 0)
        high = min(int(center + support + 0.5), source)
        weights = np.array([_lanczos((x - center + 0.5) / filterscale) for x in range(low, high)])
        if weights.sum() != 0:
            weights = weights / weights.sum()
        fixed = weights * (1 << PIL_PRECISION_BITS)
        matrix[out, low:high] = np.trunc(np.where(fixed < 0, fixed - 0.5, fixed + 0.5))   # C's (int) rounds to 0
    return torch.from_numpy(matrix)


def _resize_passes(x: Tensor, rows: Tensor, cols: Tensor, vertical_first: bool) -> Tensor:
    """(N, 3, H, W) float64 0..255 -> (N, 3, S, S): both passes, each stored as uint8."""
    if vertical_first:
        return _pil_pass(torch.matmul(_pil_pass(torch.matmul(rows, x)), cols))
    return _pil_pass(torch.matmul(rows, _pil_pass(torch.matmul(x, cols))))


def pil_vertical_first(height: int, width: int, size: int) -> bool:
    """Which pass the installed Pillow runs first for this resize (its choice depends on the shapes and
    has changed between versions): the order whose result equals Pillow's on random images, bit for bit."""
    from .backbone import resize_image

    rows, cols = lanczos_matrix(height, size), lanczos_matrix(width, size).T
    images = np.random.default_rng(0).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
    expected = np.stack([resize_image(image, size) for image in images])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    for vertical_first in (False, True):
        ours = _resize_passes(x, rows, cols, vertical_first).permute(0, 2, 3, 1).numpy()
        if np.array_equal(ours, expected):
            return vertical_first
    raise ExportError(f"cannot reproduce this Pillow's Lanczos resize from {height}x{width} to {size}x{size} "
                      f"exactly; export with --image-size {size}x{size} and resize the images before")


class LanczosResize(nn.Module):
    """Pillow's Lanczos resize of 8-bit images from ``height`` x ``width`` to ``size`` x ``size`` in standard
    operators, bit for bit: (N, 3, H, W) float 0..255 holding 8-bit values -> (N, 3, S, S). Pillow's fixed-point
    coefficients as two constant float64 matrices (the sums stay exact integers), each pass stored as uint8, the
    passes in the order the installed Pillow runs them (found at construction)."""

    def __init__(self, height: int, width: int, size: int):
        super().__init__()
        self.source = (int(height), int(width))
        self.register_buffer("rows", lanczos_matrix(height, size), persistent=False)
        self.register_buffer("cols", lanczos_matrix(width, size).T.contiguous(), persistent=False)
        self.vertical_first = pil_vertical_first(height, width, size)

    def forward(self, pixels: Tensor) -> Tensor:
        return _resize_passes(pixels.double(), self.rows, self.cols, self.vertical_first).to(pixels.dtype)


def _pil_pass(x: Tensor) -> Tensor:
    """A fixed-point sum of one resize pass -> the uint8 value Pillow stores: (sum + 2^21) >> 22, clipped."""
    return torch.floor((x + (1 << (PIL_PRECISION_BITS - 1))) / (1 << PIL_PRECISION_BITS)).clamp(0, 255)


class ExportedDetector(nn.Module):
    """The whole inference of a run as one module of standard operators (what ``rlr export`` traces)."""

    def __init__(self, extractor, model, image_size: tuple, input_dtype: str = "uint8", level_stats=None,
                 scoring: str = "paper"):
        super().__init__()
        check_scoring(scoring, level_stats, len(model.levels))
        # the run's scoring; a standardising one's statistics are constants of the graph
        self.level_stats, self.scoring = level_stats, scoring
        if input_dtype not in INPUT_DTYPES:
            raise ExportError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
        self.backbone, self.avg_pool = extractor.model, extractor.avg_pool
        self.model, self.input_dtype = model, input_dtype
        self.size = extractor.input_size
        self.image_size = tuple(int(s) for s in image_size)
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ExportError(f"image_size must be (H, W) with positive sides, got {image_size!r}")
        self.lanczos = LanczosResize(*self.image_size, self.size) if self.image_size != (self.size, self.size) else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.attention = nn.ModuleList(WindowedAttention(level.grid, level.layers[0].window) for level in model.levels)
        self.blur = GaussianBlur(self.size)

    def _pixels(self, images: Tensor) -> Tensor:
        """Input -> float (N, 3, S, S) in 0..255 holding the uint8 values rlr's PIL resize gives."""
        x = images.float() if self.input_dtype == "uint8" else torch.floor(images * 255 + 0.5)
        return self.lanczos(x) if self.lanczos is not None else x

    def forward(self, images: Tensor) -> tuple:
        x = (self._pixels(images) / 255 - self.mean) / self.std
        tokens = []
        for m in self.backbone(x):
            if self.avg_pool:
                m = F.avg_pool2d(m, 3, stride=1, padding=1)
            tokens.append(m.flatten(2).transpose(1, 2))
        reconstructions = [level(f, attention) for level, attention, f in zip(self.model.levels, self.attention, tokens)]
        maps = self.blur(anomaly_maps(tokens, reconstructions, [level.grid for level in self.model.levels], self.size,
                                       self.level_stats, self.scoring))
        return maps.flatten(1).amax(dim=1), maps


def export(run_dir, out, *, format: str = "onnx", image_size: Optional[tuple] = None, input_dtype: str = "uint8",
           opset: Optional[int] = None, log=print) -> Path:
    """Write the run in ``run_dir`` as one ``format`` graph to ``out`` (see the module docstring)."""
    if format not in FORMATS:
        raise ExportError(f"unsupported export format {format!r}; rlr exports {', '.join(FORMATS)}")
    if format == "openvino":
        return _export_openvino(run_dir, out, image_size=image_size, input_dtype=input_dtype, opset=opset, log=log)
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: the exporter needs opset {MIN_OPSET} or later")
    try:
        import onnx  # noqa: F401 - the exporter needs onnx and onnxscript
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(f"ONNX export needs the packages onnx and onnxscript ({err}): "
                          f"`pip install onnx onnxscript`") from None
    try:
        run, extractor, _ = open_run(run_dir, "cpu", backend="reference")
    except RunError as err:
        raise ExportError(f"cannot export {run_dir}: {err}") from None
    size = extractor.input_size
    image_size = tuple(image_size) if image_size is not None else (size, size)
    module = ExportedDetector(extractor, run.model, image_size, input_dtype, run.level_stats,
                              run.config.scoring).eval()
    dtype = torch.uint8 if input_dtype == "uint8" else torch.float32
    example = (torch.rand(2, 3, *image_size) * 255).to(dtype) if dtype == torch.uint8 else torch.rand(2, 3, *image_size)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=[SCORE_OUTPUT, MAP_OUTPUT], dynamic_shapes=({0: batch},),
                                    opset_version=opset, verbose=False)
    proto = program.model_proto
    stored = thresholds.load(run.folder)
    metadata = {
        "rlr.version": __version__,
        "rlr.threshold": json.dumps(stored.to_dict()) if stored is not None else "",
        "rlr.config": json.dumps(run.config.to_dict()),
        "rlr.input": json.dumps({"name": INPUT_NAME, "layout": "NCHW", "channels": "RGB", "dtype": input_dtype,
                                 "range": "0..255" if input_dtype == "uint8" else "0..1",
                                 "height": image_size[0], "width": image_size[1], "model_size": size}),
        "rlr.outputs": json.dumps({SCORE_OUTPUT: "(N,) max of the blurred anomaly map",
                                   MAP_OUTPUT: f"(N, {size}, {size}) blurred anomaly map"}),
    }
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = atomic_write_bytes(out, proto.SerializeToString())
    log(f"exported {run.folder} to {path} (ONNX opset {proto.opset_import[0].version}, input {INPUT_NAME} "
        f"(N, 3, {image_size[0]}, {image_size[1]}) {input_dtype}, outputs {SCORE_OUTPUT} and {MAP_OUTPUT}; "
        + ("threshold in the metadata)" if stored is not None else "the run has no threshold: none in the metadata)"))
    return path


def _export_openvino(run_dir, out, *, image_size, input_dtype: str, opset: Optional[int], log) -> Path:
    """The ONNX graph converted by OpenVINO (``openvino.convert_model``) and saved as its IR: ``out`` (.xml, the
    graph) and the .bin beside it (the weights, kept float32), the ONNX file's metadata as the model's
    runtime info under ``rlr`` (``model.get_rt_info(["rlr", "threshold"])``)."""
    import tempfile

    from .atomic import publish, temporary_sibling

    out = Path(out)
    if out.suffix != ".xml":
        raise ExportError(f"an OpenVINO model is a .xml file with its weights in a .bin beside it: give --out "
                          f"NAME.xml, got {out}")
    try:
        import openvino as ov
    except ImportError as err:
        raise ExportError(f"OpenVINO export needs the package openvino ({err}): `pip install openvino`") from None
    import onnx

    with tempfile.TemporaryDirectory() as folder:
        onnx_file = export(run_dir, Path(folder) / "model.onnx", format="onnx", image_size=image_size,
                           input_dtype=input_dtype, opset=opset, log=lambda *_: None)
        metadata = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
        model = ov.convert_model(str(onnx_file))
        for key, value in metadata.items():
            model.set_rt_info(value, ["rlr", key.removeprefix("rlr.")])
        staging = temporary_sibling(out)
        staging.mkdir(parents=True)
        try:
            ov.save_model(model, str(staging / out.name), compress_to_fp16=False)   # float32 weights: rlr's numbers
            weights = out.with_suffix(".bin")
            publish(staging / weights.name, weights)    # the weights first: a graph is never seen without them
            publish(staging / out.name, out)
        finally:
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
    log(f"exported {run_dir} to {out} and {out.with_suffix('.bin')} (OpenVINO IR {ov.__version__.split('-')[0]}, "
        f"converted from the ONNX graph: input {INPUT_NAME}, outputs {SCORE_OUTPUT} and {MAP_OUTPUT}; rlr's metadata "
        f"in the model's runtime info under 'rlr')")
    return out
