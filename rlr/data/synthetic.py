"""A small multi-class anomaly data set, generated offline, in MVTec AD layout (issue 5).

    generate_dataset(root, seed=0, size=256, n_train=36, n_test_good=10, n_test_defect=15, classes=None)
    render_sample(class_name, stream, index, seed=0, size=256, defect=None) -> (uint8 image, bool mask)

Four classes, two textures and two objects, built from scikit-image's bundled sample
photographs (``skimage.data``) and procedural drawing:

    class    kind                     defect kinds
    brick    texture (photo)          crack, hole, stain
    fabric   texture (procedural)     hole, thread (contamination), color (dye spot)
    washer   object (procedural)      scratch, missing (part), extra (burr), contamination
    cup      object (photo)           crack, stain, color (colour shift)

Normal images vary like real captures: crop position / shift, small rotation and scale, weave
phase and thread irregularity, illumination gain, colour balance and gradient, sensor noise.

Each image is rendered as a clean scene, then (for a defective image) the defect alters the
scene inside its region only, then illumination and sensor noise (identical for the normal and
the defective version of a sample: they come from the sample's own random stream) are applied
and the result is quantised to uint8. A region pixel the defect leaves unchanged after
quantisation is raised by one grey level, so the saved mask is *exactly* the set of pixels where
the defective image differs from its normal counterpart ``render_sample(..., defect=None)``.

Deterministic: every sample draws from ``numpy.random.SeedSequence([seed, class, stream,
index])``, so an image does not depend on the counts or on the other classes generated.
"""
from __future__ import annotations

import functools
import json
import os
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .images import DatasetError

GENERATOR_VERSION = 1
SYNTHETIC_CLASSES = ("brick", "fabric", "washer", "cup")
DEFECT_KINDS = {
    "brick": ("crack", "hole", "stain"),
    "fabric": ("hole", "thread", "color"),
    "washer": ("scratch", "missing", "extra", "contamination"),
    "cup": ("crack", "stain", "color"),
}
STREAMS = ("train", "test_good", "test_defect")
MARKER_FILE = "synthetic.json"


# ----------------------------------------------------------------------------- drawing helpers

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, zero mean, unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / max(float(field.std()), 1e-6)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return yy ** 2 + xx ** 2 <= radius ** 2 + 0.25


def _blob(size: int, center: tuple[float, float], radius: float, rng: np.random.Generator,
          irregularity: float = 0.35) -> np.ndarray:
    """An irregular filled shape: a disc whose radius varies with angle by a few harmonics."""
    yy, xx = _grid(size)
    dy, dx = yy - center[0], xx - center[1]
    theta = np.arctan2(dy, dx)
    boundary = np.ones_like(theta)
    for k in range(2, 6):
        boundary += rng.uniform(0, irregularity / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) <= radius * boundary


def _rasterise(points: np.ndarray, size: int, width: int) -> np.ndarray:
    """Pixels covered by a polyline (N, 2) of (row, col) points, thickened to ``width`` px."""
    seg = np.diff(points, axis=0)
    steps = np.maximum(np.ceil(np.hypot(seg[:, 0], seg[:, 1]) * 4).astype(int), 1)
    dense = [points[i] + seg[i] * np.linspace(0, 1, steps[i], endpoint=False)[:, None] for i in range(len(seg))]
    dense = np.concatenate(dense + [points[-1:]])
    rows, cols = np.floor(dense[:, 0]).astype(int), np.floor(dense[:, 1]).astype(int)
    inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    line = np.zeros((size, size), dtype=bool)
    line[rows[inside], cols[inside]] = True
    if width > 1:
        line = ndimage.binary_dilation(line, structure=_disk(width // 2))
    return line


def _random_walk(rng: np.random.Generator, start, heading: float, length: float, step: float,
                 turn: float) -> np.ndarray:
    n = max(int(length / step), 2)
    headings = heading + np.cumsum(rng.normal(0, turn, n))
    moves = np.stack([np.sin(headings), np.cos(headings)], axis=1) * step
    return np.concatenate([np.asarray(start, dtype=np.float64)[None], start + np.cumsum(moves, axis=0)])


def _bezier(control: np.ndarray, n: int = 200) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    p0, p1, p2, p3 = control
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t ** 2 * p2 + t ** 3 * p3


def _pick(support: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A random pixel centre of a non-empty boolean support."""
    rows, cols = np.nonzero(support)
    i = rng.integers(len(rows))
    return float(rows[i]) + 0.5, float(cols[i]) + 0.5


def _warp(image: np.ndarray, size: int, center, angle: float, scale: float) -> tuple[np.ndarray, tuple]:
    """Sample a rotated, scaled square of ``image`` (H, W, C) around ``center`` into (size, size, C).

    ``scale``: source pixels per output pixel. Returns the image and the source coordinates.
    """
    yy, xx = _grid(size)
    dy, dx = (yy - (size - 1) / 2) * scale, (xx - (size - 1) / 2) * scale
    cos, sin = np.cos(angle), np.sin(angle)
    src = (center[0] + cos * dy - sin * dx, center[1] + sin * dy + cos * dx)
    channels = [ndimage.map_coordinates(image[..., c], src, order=1, mode="reflect") for c in range(image.shape[-1])]
    return np.stack(channels, axis=-1), src


# ----------------------------------------------------------------------------- scenes

class Scene:
    """A clean rendering (float32 (S, S, 3) in [0, 1]) and where defects may be centred."""

    def __init__(self, image: np.ndarray, support: np.ndarray, **layers):
        self.image = image.astype(np.float32)
        self.support = support
        self.layers = layers


@functools.lru_cache(maxsize=None)
def _photo(name: str, blur: float) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)().astype(np.float32) / 255.0
    if image.ndim == 2:
        image = image[..., None]
    return ndimage.gaussian_filter(image, (blur, blur, 0))


def _texture_support(size: int) -> np.ndarray:
    margin = max(int(0.12 * size), 2)
    support = np.zeros((size, size), dtype=bool)
    support[margin:-margin, margin:-margin] = True
    return support


def _brick(rng: np.random.Generator, size: int) -> Scene:
    source = _photo("brick", 0.6)
    side = rng.uniform(0.6, 0.7) * source.shape[0]
    half = side / 2
    center = (rng.uniform(half, source.shape[0] - half), rng.uniform(half, source.shape[1] - half))
    gray, _ = _warp(source, size, center, np.deg2rad(rng.normal(0, 1.5)), side / size)
    tint = np.array([1.0, 0.74, 0.62], dtype=np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    image = np.clip(gray, 0, 1) ** 0.9 * tint * 1.05
    return Scene(image, _texture_support(size))


def _fabric(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _grid(size)
    period = size / rng.uniform(23.0, 24.5)
    angle = np.deg2rad(rng.normal(0, 2.0))
    u = (np.cos(angle) * xx + np.sin(angle) * yy) / period + rng.uniform(0, 2)
    v = (-np.sin(angle) * xx + np.cos(angle) * yy) / period + rng.uniform(0, 2)
    # Threads wander a little sideways and vary in tone, as in a real weave.
    u = u + 0.06 * _smooth_noise(rng, (size, size), size / 12)
    v = v + 0.06 * _smooth_noise(rng, (size, size), size / 12)
    iu, iv = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = u - iu, v - iv
    tone_warp = rng.normal(1.0, 0.05, 64).astype(np.float32)
    tone_weft = rng.normal(1.0, 0.05, 64).astype(np.float32)
    warp_over = (iu + iv) % 2 == 0
    across_warp = np.sin(np.pi * np.clip((fu - 0.06) / 0.88, 0, 1)) ** 0.6
    across_weft = np.sin(np.pi * np.clip((fv - 0.06) / 0.88, 0, 1)) ** 0.6
    along_warp = 0.8 + 0.2 * np.sin(np.pi * fv)
    along_weft = 0.8 + 0.2 * np.sin(np.pi * fu)
    warp_color = np.array([0.22, 0.33, 0.58], dtype=np.float32) * rng.uniform(0.96, 1.04)
    weft_color = np.array([0.80, 0.80, 0.84], dtype=np.float32) * rng.uniform(0.96, 1.04)
    warp = (across_warp * along_warp * tone_warp[iu % 64])[..., None] * warp_color
    weft = (across_weft * along_weft * tone_weft[iv % 64])[..., None] * weft_color
    fibre = 1.0 + 0.05 * _smooth_noise(rng, (size, size), 0.8)[..., None]
    image = np.where(warp_over[..., None], warp, weft) * fibre + 0.03
    return Scene(image, _texture_support(size))


def _washer(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _grid(size)
    cy = (size - 1) / 2 + rng.normal(0, 0.015 * size)
    cx = (size - 1) / 2 + rng.normal(0, 0.015 * size)
    outer = 0.34 * size * rng.uniform(0.985, 1.015)
    inner = 0.16 * size * rng.uniform(0.985, 1.015)
    key_angle = np.deg2rad(-90 + rng.normal(0, 6))
    dy, dx = yy - cy, xx - cx
    r = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    ring = np.clip(outer - r + 0.5, 0, 1) * np.clip(r - inner + 0.5, 0, 1)
    along = np.cos(key_angle) * dx + np.sin(key_angle) * dy
    across = -np.sin(key_angle) * dx + np.cos(key_angle) * dy
    tab_length, tab_width = 0.07 * size, 0.1 * size
    tab = (np.clip(outer + tab_length - along + 0.5, 0, 1) * np.clip(tab_width / 2 - np.abs(across) + 0.5, 0, 1)
           * (along > (outer + inner) / 2))
    alpha = np.maximum(ring, tab)
    light = rng.uniform(0, 2 * np.pi)
    brushed = 0.035 * np.sin(r * 2 * np.pi / 1.9 + 2.5 * _smooth_noise(rng, (size, size), size / 20))
    shade = 0.62 + 0.16 * np.cos(theta - light) + 0.08 * (r - inner) / (outer - inner) + brushed
    metal = np.clip(shade, 0, 1)[..., None] * np.array([0.78, 0.8, 0.84], dtype=np.float32)
    belt = 0.2 + 0.012 * _smooth_noise(rng, (size, size), 1.2)
    background = belt[..., None] * np.array([0.95, 1.0, 1.0], dtype=np.float32)
    image = alpha[..., None] * metal + (1 - alpha[..., None]) * background
    solid = ndimage.binary_erosion(ring >= 1, structure=_disk(2))
    return Scene(image, solid, alpha=alpha, metal=metal, background=background, center=(cy, cx),
                 outer=outer, inner=inner)


def _cup(rng: np.random.Generator, size: int) -> Scene:
    source = _photo("coffee", 0.5)
    scale = 400.0 / size * rng.uniform(0.98, 1.02)
    center = (200 + rng.normal(0, 5), 278 + rng.normal(0, 5))
    image, (sy, sx) = _warp(source, size, center, np.deg2rad(rng.normal(0, 2.0)), scale)
    # The cup and saucer, as an ellipse in the photo's own coordinates (so it follows the warp).
    support = ((sy - 215) / 150) ** 2 + ((sx - 275) / 175) ** 2 <= 1.0
    image = np.clip(image, 0, 1)
    # White porcelain: where a crack shows (the rim and inside of the cup).
    porcelain = ndimage.binary_erosion(support & (image.min(axis=-1) > 0.6), iterations=2)
    return Scene(image, support, porcelain=porcelain if porcelain.any() else support)


SCENES: dict[str, Callable[[np.random.Generator, int], Scene]] = {
    "brick": _brick, "fabric": _fabric, "washer": _washer, "cup": _cup,
}


# ----------------------------------------------------------------------------- defects
# Each takes the clean scene, its own random stream and the size, and returns the altered image
# (only its values inside the region are used) and the region (bool (S, S)).

def _crack(scene: Scene, rng, size: int, darkness=(0.25, 0.45), on: str | None = None):
    start = _pick(scene.layers[on] if on else scene.support, rng)
    points = _random_walk(rng, start, rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.35) * size,
                          max(size / 64, 1.0), 0.35)
    region = _rasterise(points, size, int(rng.integers(1, 3)) if size >= 128 else 1)
    if rng.random() < 0.6:  # a side branch
        k = int(rng.integers(len(points) // 3, max(len(points) // 3 + 1, 2 * len(points) // 3)))
        branch = _random_walk(rng, points[k], rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.12) * size,
                              max(size / 64, 1.0), 0.4)
        region |= _rasterise(branch, size, 1)
    altered = scene.image * rng.uniform(*darkness)
    return altered, region


def _hole(scene: Scene, rng, size: int):
    """A chipped-out cavity: the material seen deeper, darker, rougher, lit from one side."""
    center = _pick(scene.support, rng)
    radius = rng.uniform(0.03, 0.07) * size
    region = _blob(size, center, radius, rng)
    yy, xx = _grid(size)
    light = rng.uniform(0, 2 * np.pi)
    side = (np.cos(light) * (xx - center[1]) + np.sin(light) * (yy - center[0])) / radius
    rough = 0.08 * _smooth_noise(rng, (size, size), 1.0)
    shade = np.clip(rng.uniform(0.3, 0.45) + 0.15 * side + rough, 0.05, 1)[..., None]
    return scene.image * shade, region


def _cut(scene: Scene, rng, size: int):
    """A hole through the cloth: the dark table shows through."""
    center = _pick(scene.support, rng)
    region = _blob(size, center, rng.uniform(0.03, 0.06) * size, rng)
    depth = rng.uniform(0.03, 0.06) + 0.03 * _smooth_noise(rng, (size, size), 2.0)
    return np.clip(depth, 0, 1)[..., None] * np.array([1.0, 0.95, 0.9], dtype=np.float32), region


def _fabric_hole(scene: Scene, rng, size: int):
    altered, region = _cut(scene, rng, size)
    # Frayed threads hanging from the edge of the cut, in the weft colour.
    frays = np.zeros_like(region)
    rows, cols = np.nonzero(region)
    for _ in range(int(rng.integers(2, 5))):
        i = rng.integers(len(rows))
        points = _random_walk(rng, (rows[i] + 0.5, cols[i] + 0.5), rng.uniform(0, 2 * np.pi),
                              rng.uniform(0.03, 0.07) * size, 1.0, 0.3)
        frays |= _rasterise(points, size, 1)
    frays &= ~ndimage.binary_erosion(region, iterations=2)
    altered = np.where(frays[..., None], np.array([0.78, 0.77, 0.74], dtype=np.float32), altered)
    return altered, region | frays


def _stain(scene: Scene, rng, size: int):
    center = _pick(scene.support, rng)
    radius = rng.uniform(0.05, 0.11) * size
    region = _blob(size, center, radius, rng, irregularity=0.5)
    # Oil, moss, soot: darken and tint the surface.
    color = np.asarray(rng.choice([[0.35, 0.3, 0.2], [0.2, 0.25, 0.18], [0.15, 0.12, 0.1]]), dtype=np.float32)
    strength = rng.uniform(0.45, 0.75) * (0.8 + 0.2 * np.clip(_smooth_noise(rng, (size, size), size / 40), -1, 1))
    strength = np.clip(strength, 0, 0.95)[..., None]
    return scene.image * (1 - strength) + scene.image * color * strength * 1.4, region


def _drop_stain(scene: Scene, rng, size: int):
    """A dried drop: coffee-brown on bright porcelain, milky residue on the dark glaze."""
    center = _pick(scene.support, rng)
    region = _blob(size, center, rng.uniform(0.04, 0.08) * size, rng, irregularity=0.5)
    edge = ndimage.distance_transform_edt(region)
    bright = scene.image[int(center[0]), int(center[1])].mean() > 0.5
    color = np.array([0.5, 0.3, 0.14] if bright else [0.85, 0.78, 0.66], dtype=np.float32)
    strength = rng.uniform(0.35, 0.6) * (1 + 0.6 * np.exp(-edge / 2.0)) * (
        0.85 + 0.15 * np.clip(_smooth_noise(rng, (size, size), size / 40), -1, 1))
    strength = np.clip(strength, 0, 0.95)[..., None]
    return scene.image * (1 - strength) + color * strength, region


def _color_shift(scene: Scene, rng, size: int):
    center = _pick(scene.support, rng)
    region = _blob(size, center, rng.uniform(0.06, 0.12) * size, rng)
    permuted = scene.image[..., list(rng.choice([[2, 0, 1], [1, 2, 0], [0, 2, 1]]))]
    mix = rng.uniform(0.45, 0.85)
    return (1 - mix) * scene.image + mix * permuted, region


def _thread(scene: Scene, rng, size: int):
    start = np.array(_pick(scene.support, rng))
    heading = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.25, 0.5) * size
    direction = np.array([np.sin(heading), np.cos(heading)])
    normal = np.array([-direction[1], direction[0]])
    control = np.stack([start + direction * length * t + normal * rng.normal(0, 0.15) * length
                        for t in (0.0, 0.33, 0.66, 1.0)])
    region = _rasterise(_bezier(control), size, 1 if size < 192 else int(rng.integers(1, 3)))
    color = np.asarray(rng.choice([[0.65, 0.12, 0.1], [0.08, 0.08, 0.08], [0.85, 0.7, 0.2]]), dtype=np.float32)
    return np.broadcast_to(color, scene.image.shape), region


def _scratch(scene: Scene, rng, size: int):
    start = np.array(_pick(scene.support, rng))
    heading = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.08, 0.2) * size
    end = start + length * np.array([np.sin(heading), np.cos(heading)])
    middle = (start + end) / 2 + rng.normal(0, 0.05 * length, 2)
    region = _rasterise(_bezier(np.stack([start, middle, middle, end])), size, 1) & scene.support
    bright = rng.random() < 0.5
    altered = np.clip(scene.image + 0.3, 0, 1) if bright else scene.image * 0.45
    return altered, region


def _missing(scene: Scene, rng, size: int):
    layers = scene.layers
    angle = rng.uniform(0, 2 * np.pi)
    edge = layers["outer"] if rng.random() < 0.7 else layers["inner"]
    center = (layers["center"][0] + edge * np.sin(angle), layers["center"][1] + edge * np.cos(angle))
    cut = _blob(size, center, rng.uniform(0.05, 0.09) * size, rng)
    region = cut & (layers["alpha"] > 0)
    return layers["background"], region


def _extra(scene: Scene, rng, size: int):
    layers = scene.layers
    angle = rng.uniform(0, 2 * np.pi)
    distance = layers["outer"] + rng.uniform(0.0, 0.02) * size
    center = (layers["center"][0] + distance * np.sin(angle), layers["center"][1] + distance * np.cos(angle))
    burr = _blob(size, center, rng.uniform(0.025, 0.05) * size, rng, irregularity=0.6)
    region = burr & (layers["alpha"] < 1)
    return layers["metal"], region


def _contamination(scene: Scene, rng, size: int):
    center = _pick(scene.support, rng)
    region = _blob(size, center, rng.uniform(0.015, 0.035) * size, rng, irregularity=0.7)
    color = np.asarray(rng.choice([[0.45, 0.25, 0.12], [0.1, 0.09, 0.08], [0.5, 0.45, 0.3]]), dtype=np.float32)
    texture = 1 + 0.15 * _smooth_noise(rng, (size, size), 1.0)[..., None]
    return np.clip(color * texture, 0, 1), region


DEFECTS: dict[tuple[str, str], Callable] = {
    ("brick", "crack"): _crack,
    ("brick", "hole"): _hole,
    ("brick", "stain"): _stain,
    ("fabric", "hole"): _fabric_hole,
    ("fabric", "thread"): _thread,
    ("fabric", "color"): _color_shift,
    ("washer", "scratch"): _scratch,
    ("washer", "missing"): _missing,
    ("washer", "extra"): _extra,
    ("washer", "contamination"): _contamination,
    ("cup", "crack"): functools.partial(_crack, darkness=(0.3, 0.5), on="porcelain"),
    ("cup", "stain"): _drop_stain,
    ("cup", "color"): _color_shift,
}


# ----------------------------------------------------------------------------- samples

def _stream(seed: int, class_name: str, stream: str, index: int, part: int) -> np.random.Generator:
    key = [int(seed), zlib.crc32(class_name.encode()), STREAMS.index(stream), int(index), part]
    return np.random.default_rng(np.random.SeedSequence(key))


def _capture(image: np.ndarray, rng: np.random.Generator, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """Draw one capture's illumination and sensor noise; return the function applying them."""
    yy, xx = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = 1 + rng.uniform(0, 0.08) * (np.cos(angle) * (xx / size - 0.5) + np.sin(angle) * (yy / size - 0.5)) * 2
    gain = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    noise = rng.normal(0, rng.uniform(0.005, 0.012), image.shape).astype(np.float32)

    def apply(scene_image: np.ndarray) -> np.ndarray:
        lit = scene_image * gradient[..., None] * gain + noise
        return np.clip(np.rint(lit * 255), 0, 255).astype(np.uint8)

    return apply


def render_sample(class_name: str, stream: str, index: int, seed: int = 0, size: int = 256,
                  defect: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One sample: uint8 (size, size, 3) image and bool (size, size) mask (all False if no defect).

    ``stream`` is "train", "test_good" or "test_defect"; the data set's i-th image of a stream is
    ``index=i``. With ``defect=None`` a test_defect sample renders without its defect: the
    normal counterpart, identical outside the mask.
    """
    if class_name not in SCENES:
        raise DatasetError(f"unknown synthetic class {class_name!r}; classes: {list(SYNTHETIC_CLASSES)}")
    if stream not in STREAMS:
        raise ValueError(f"render_sample: stream must be one of {STREAMS}, got {stream!r}")
    if defect is not None and defect not in DEFECT_KINDS[class_name]:
        raise DatasetError(
            f"unknown defect {defect!r} for class {class_name!r}; kinds: {list(DEFECT_KINDS[class_name])}")
    rng = _stream(seed, class_name, stream, index, 0)
    scene = SCENES[class_name](rng, size)
    capture = _capture(scene.image, rng, size)
    normal = capture(scene.image)
    if defect is None:
        return normal, np.zeros((size, size), dtype=bool)

    defect_rng = _stream(seed, class_name, stream, index, 1)
    min_area = max(6, int(round(20 * (size / 256) ** 2)))
    for _ in range(50):  # redraw a defect that falls (almost) outside the object
        altered, region = DEFECTS[(class_name, defect)](scene, defect_rng, size)
        if region.sum() >= min_area:
            break
    else:
        raise RuntimeError(f"synthetic {class_name}/{defect} #{index}: no defect placement found")
    image = capture(np.where(region[..., None], altered, scene.image).astype(np.float32))
    # Every region pixel must differ from the normal capture, every other pixel must not.
    unchanged = region & (image == normal).all(axis=-1)
    image[unchanged] = np.where(normal[unchanged] < 255, normal[unchanged] + 1, normal[unchanged] - 1)
    return image, region


# ----------------------------------------------------------------------------- data set

def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def generate_dataset(root: str | os.PathLike, seed: int = 0, size: int = 256, n_train: int = 36,
                     n_test_good: int = 10, n_test_defect: int = 15,
                     classes: Sequence[str] | None = None) -> Path:
    """Write the synthetic set in MVTec AD layout under ``root`` and return ``root``.

    ROOT/CLASS/train/good/000.png, ROOT/CLASS/test/{good,DEFECT}/000.png,
    ROOT/CLASS/ground_truth/DEFECT/000_mask.png (0/255), and ROOT/synthetic.json (the
    parameters; written last). Defective images cycle through the class's defect kinds.
    If ROOT already holds a set generated with the same parameters it is reused as is; any
    other non-empty ROOT is an error (nothing is overwritten).
    """
    classes = list(SYNTHETIC_CLASSES if classes is None else classes)
    unknown = [c for c in classes if c not in SYNTHETIC_CLASSES]
    if unknown or not classes:
        raise DatasetError(f"unknown synthetic class(es) {unknown or classes}; available: {list(SYNTHETIC_CLASSES)}")
    if not isinstance(size, (int, np.integer)) or size < 64:
        raise ValueError(f"generate_dataset: size must be an int >= 64, got {size!r}")
    counts = (("n_train", n_train, 1), ("n_test_good", n_test_good, 0), ("n_test_defect", n_test_defect, 0))
    for name, value, least in counts:
        if not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"generate_dataset: {name} must be an int >= {least}, got {value!r}")

    root = Path(root)
    marker = {
        "generator": "rlr.data.synthetic", "version": GENERATOR_VERSION, "seed": int(seed), "size": int(size),
        "n_train": int(n_train), "n_test_good": int(n_test_good), "n_test_defect": int(n_test_defect),
        "classes": classes, "defects": {c: list(DEFECT_KINDS[c]) for c in classes},
    }
    if root.exists() and not root.is_dir():
        raise DatasetError(f"generate_dataset: {root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()):
        try:
            existing = json.loads((root / MARKER_FILE).read_text())
        except (OSError, ValueError):
            existing = None
        if existing == marker:
            return root
        raise DatasetError(
            f"generate_dataset: {root} is not empty and holds no synthetic set with these parameters; "
            f"use an empty or new folder"
        )

    for class_name in classes:
        folder = root / class_name
        for i in range(n_train):
            image, _ = render_sample(class_name, "train", i, seed, size)
            _save_png(image, folder / "train" / "good" / f"{i:03d}.png")
        for i in range(n_test_good):
            image, _ = render_sample(class_name, "test_good", i, seed, size)
            _save_png(image, folder / "test" / "good" / f"{i:03d}.png")
        kinds = DEFECT_KINDS[class_name]
        counters = {kind: 0 for kind in kinds}
        for i in range(n_test_defect):
            kind = kinds[i % len(kinds)]
            image, mask = render_sample(class_name, "test_defect", i, seed, size, defect=kind)
            number = counters[kind]
            counters[kind] += 1
            _save_png(image, folder / "test" / kind / f"{number:03d}.png")
            _save_png(mask.astype(np.uint8) * 255, folder / "ground_truth" / kind / f"{number:03d}_mask.png")
        (folder / "ground_truth").mkdir(parents=True, exist_ok=True)  # masked class even with no defects
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=2))
    return root
