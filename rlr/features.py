"""Backbone feature cache: each image's tokens are computed once and reused.

The backbone is frozen and training uses no image augmentation, so an image's tokens never
change for a given setting: they are computed once, stored as float16 ``.npy`` files and
memory-mapped by every later epoch, ``rlr test`` and ``rlr train`` run.

Layout (``CACHE`` = ``--cache-dir``, else ``$RLR_CACHE_DIR``, else ``$XDG_CACHE_HOME/rlr``, else
``~/.cache/rlr``)::

    CACHE/features/<backbone>-<settings key>/settings.json     what the key stands for
    CACHE/features/<backbone>-<settings key>/<shard>.json      sha256 of each image + its (H, W)
    CACHE/features/<backbone>-<settings key>/<shard>.l<i>.npy  (N, L_i, C_i) float16, level i

The settings key hashes the backbone name, the weights' sha256, input size, out indices and
the avg-pool switch; an image is found by the sha256 of its file's bytes. A changed image or
setting therefore misses the cache and is recomputed; a stale entry is never read. Shards are
written to temporary names and published by renaming their index last, so an interrupted run
leaves no half-written shard behind. Deleting the folder is always safe.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbone import FeatureExtractor, resize_image, to_tensor
from .data import load_image

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$RLR_CACHE_DIR``, else ``$XDG_CACHE_HOME/rlr``, else ``~/.cache/rlr``."""
    if os.environ.get("RLR_CACHE_DIR"):
        return Path(os.environ["RLR_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlr"


def file_digest(path: str) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        from .data import DatasetError

        raise DatasetError(f"cannot read image file {path}: {err.strerror or err}") from None
    return digest.hexdigest()


@dataclass
class _Shard:
    arrays: list            # one memory-mapped (N, L_i, C_i) float16 array per level
    rows: dict              # image sha256 -> row
    shapes: dict            # image sha256 -> original (H, W)


class FeatureTable:
    """Tokens of an ordered list of images, gathered from memory-mapped cache shards.

    ``table.batch(indices)`` -> list of float16 arrays (n, L_i, C_i); ``table.image_shape(i)``
    -> the image's original (H, W).
    """

    def __init__(self, paths: Sequence[str], digests: Sequence[str], locations: list, shapes: list, levels: int):
        self.paths = list(paths)
        self.digests = list(digests)   # sha256 of each image file
        self._locations = locations   # per image: (shard, row)
        self._shapes = shapes
        self.levels = levels

    def __len__(self) -> int:
        return len(self.paths)

    def image_shape(self, index: int) -> tuple:
        return self._shapes[index]

    def batch(self, indices: Sequence[int]) -> list:
        out = []
        for level in range(self.levels):
            rows = [self._locations[i][0].arrays[level][self._locations[i][1]] for i in indices]
            out.append(np.stack(rows))
        return out

    def tensors(self, indices: Sequence[int], device="cpu", dtype=torch.float32) -> list:
        """``batch(indices)`` as tensors on ``device`` in ``dtype``."""
        return [torch.from_numpy(a).to(device=device, dtype=dtype, non_blocking=True) for a in self.batch(indices)]

    def load_all(self) -> "FeatureTable":
        """Read every row into memory once (faster random access for training on small sets)."""
        arrays = [np.ascontiguousarray(a) for a in self.batch(range(len(self)))]
        shard = _Shard(arrays, {}, {})
        return FeatureTable(self.paths, self.digests, [(shard, i) for i in range(len(self))], list(self._shapes),
                            self.levels)


class FeatureCache:
    """Computes and caches the tokens of images for one extractor (backbone + settings)."""

    def __init__(self, extractor: FeatureExtractor, cache_dir: Optional[str] = None, device="cpu",
                 batch_size: int = 16, progress: bool = True):
        self.extractor = extractor.to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.progress = progress
        settings = {
            "cache_version": CACHE_VERSION,
            "backbone": extractor.name,
            "weights_sha256": extractor.weights_id,
            "input_size": extractor.input_size,
            "out_indices": list(extractor.model.feature_info.out_indices),
            "avg_pool": extractor.avg_pool,
        }
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        safe_name = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in extractor.name)
        self.folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.folder = self.folder / "features" / f"{safe_name}-{key}"
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_file = self.folder / "settings.json"
        if not settings_file.exists():
            _atomic_write_text(settings_file, json.dumps(settings, indent=2) + "\n")
        self._shards: dict = {}

    # ------------------------------------------------------------------ index

    def _scan(self) -> dict:
        """sha256 -> (shard, row) for every published shard."""
        found = {}
        for index_file in sorted(self.folder.glob("*.json")):
            if index_file.name == "settings.json":
                continue
            name = index_file.stem
            if name not in self._shards:
                try:
                    meta = json.loads(index_file.read_text())
                    arrays = [np.load(self.folder / f"{name}.l{i}.npy", mmap_mode="r") for i in range(meta["levels"])]
                except (OSError, ValueError, KeyError):
                    continue   # a foreign or damaged file is ignored, never trusted
                if any(a.shape[0] != len(meta["hashes"]) for a in arrays):
                    continue
                self._shards[name] = _Shard(arrays, {h: r for r, h in enumerate(meta["hashes"])},
                                            {h: tuple(s) for h, s in zip(meta["hashes"], meta["shapes"])})
            shard = self._shards[name]
            for digest, row in shard.rows.items():
                found.setdefault(digest, (shard, row))
        return found

    # ------------------------------------------------------------------ public

    def features(self, paths: Sequence[str], description: str = "features") -> FeatureTable:
        """Tokens of ``paths`` (in order), computing and caching the images not cached yet."""
        paths = [str(p) for p in paths]
        digests = [file_digest(p) for p in paths]
        found = self._scan()
        missing = {}
        for path, digest in zip(paths, digests):
            if digest not in found and digest not in missing:
                missing[digest] = path
        if missing:
            self._compute_shard(list(missing.items()), description)
            found = self._scan()
        levels = len(self.extractor.channels)
        locations = [found[d] for d in digests]
        shapes = [loc[0].shapes[d] for loc, d in zip(locations, digests)]
        return FeatureTable(paths, digests, locations, shapes, levels)

    @torch.no_grad()
    def _compute_shard(self, items: list, description: str) -> None:
        name = uuid.uuid4().hex
        size = self.extractor.input_size
        count = len(items)
        tmp_files = [self.folder / f".{name}.l{i}.npy.tmp" for i in range(len(self.extractor.channels))]
        arrays = [np.lib.format.open_memmap(f, mode="w+", dtype=np.float16, shape=(count, g[0] * g[1], c))
                  for f, g, c in zip(tmp_files, self.extractor.grids, self.extractor.channels)]
        shapes = []

        def load(item):
            image = load_image(item[1])
            return resize_image(image, size), image.shape[:2]

        try:
            bar = tqdm(total=count, desc=description, unit="img", disable=not self.progress, leave=False)
            starts = range(0, count, self.batch_size)
            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
                def submit(start):   # decode one batch ahead, so decoding overlaps the backbone
                    return [pool.submit(load, item) for item in items[start:start + self.batch_size]]

                pending = submit(0)
                for start in starts:
                    chunk = [future.result() for future in pending]
                    pending = submit(start + self.batch_size) if start + self.batch_size < count else []
                    shapes.extend([list(map(int, shape)) for _, shape in chunk])
                    batch = to_tensor([image for image, _ in chunk]).to(self.device)
                    for array, tokens in zip(arrays, self.extractor(batch)):
                        array[start:start + len(chunk)] = tokens.to(torch.float16).cpu().numpy()
                    bar.update(len(chunk))
            bar.close()
            for level, (array, tmp) in enumerate(zip(arrays, tmp_files)):
                array.flush()
                os.replace(tmp, self.folder / f"{name}.l{level}.npy")
            del arrays
            meta = {"levels": len(tmp_files), "hashes": [d for d, _ in items], "shapes": shapes,
                    "files": [p for _, p in items]}
            _atomic_write_text(self.folder / f"{name}.json", json.dumps(meta) + "\n")
        finally:
            for tmp in tmp_files:
                if tmp.exists():
                    tmp.unlink()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
