"""Backbone feature cache: each image's tokens are computed once and reused.

The backbone is frozen and training uses no image augmentation, so an image's tokens never
change for a given setting: they are computed once, stored as float16 ``.npy`` files and
memory-mapped by every later epoch, ``rlr test`` and ``rlr train`` run.

Layout (``CACHE`` = ``--cache-dir``, else ``$RLR_CACHE_DIR``, else ``$XDG_CACHE_HOME/rlr``, else
``~/.cache/rlr``)::

    CACHE/features/<backbone>-<settings key>/settings.json     what the key stands for
    CACHE/features/<backbone>-<settings key>/index.json        every shard: sha256 + (H, W) of its images
    CACHE/features/<backbone>-<settings key>/<shard>.l<i>.npy  (N, L_i, C_i) float16, level i

The settings key hashes the backbone name, the weights' sha256, input size, out indices and
the avg-pool switch; an image is found by the sha256 of its file's bytes. A changed image or
setting therefore misses the cache and is recomputed; a stale entry is never read.

One read of ``index.json`` (under the lock, with the memory maps of the shards it names) finds every
cached image. A call that computes new images writes them
as a new shard; once a folder holds more than ``MAX_SHARDS`` shards they are merged into one, so
a cache used by many calls stays a few files. Shard arrays are written under temporary names and
published (fsync, rename) before the index that lists them is rewritten atomically (rlr.atomic),
under a lock file, so an interrupted or concurrent run (the ranks of a torchrun job share a
cache) leaves no half-written entry. A shard found damaged is dropped with a warning and its
images recomputed. ``rlr cache list`` / ``rlr cache clear [--older-than DAYS]`` show and bound
the cache; deleting the folder is always safe.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_write_json, publish, temporary_sibling
from .backbone import FeatureExtractor, resize_image, to_tensor
from .data import load_image

CACHE_VERSION = 1
FEATURES_FOLDER = "features"
SETTINGS_FILE = "settings.json"
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
MAX_SHARDS = 8   # more shards than this in a folder are merged into one


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


class CacheWarning(UserWarning):
    """A damaged cache entry was dropped (its images are recomputed)."""


def _shard_files(folder: Path, name: str, levels: int) -> list:
    return [folder / f"{name}.l{level}.npy" for level in range(levels)]


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive use of a cache folder's index among processes (an flock on its lock file)."""
    with open(folder / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_index(folder: Path) -> dict:
    """shard name -> {"levels", "hashes", "shapes", "files"}; an unreadable index counts as empty (with a warning)."""
    path = folder / INDEX_FILE
    try:
        data = json.loads(path.read_text())
        shards = data["shards"]
        if data.get("cache_version") != CACHE_VERSION or not isinstance(shards, dict):
            raise ValueError(f"cache_version {data.get('cache_version')!r}")
        return shards
    except FileNotFoundError:
        return _legacy_index(folder)
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"feature cache index {path} is damaged ({err}): its features are recomputed", CacheWarning,
                      stacklevel=3)
        return {}


def _legacy_index(folder: Path) -> dict:
    """The shards of a folder written before index.json: one <shard>.json each."""
    shards = {}
    for meta_file in sorted(folder.glob("*.json")):
        if meta_file.name in (SETTINGS_FILE, INDEX_FILE):
            continue
        try:
            meta = json.loads(meta_file.read_text())
            shards[meta_file.stem] = {key: meta[key] for key in ("levels", "hashes", "shapes", "files")}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return shards


def _write_index(folder: Path, shards: dict) -> None:
    """Rewrite the index (atomically), then delete what it no longer lists: old shard arrays and
    legacy per-shard index files. Call under ``_locked``."""
    atomic_write_json(folder / INDEX_FILE, {"cache_version": CACHE_VERSION, "shards": shards})
    listed = {f.name for name, meta in shards.items() for f in _shard_files(folder, name, meta["levels"])}
    for entry in folder.iterdir():
        legacy = entry.suffix == ".json" and entry.name not in (SETTINGS_FILE, INDEX_FILE)
        if legacy or (entry.suffix == ".npy" and entry.name not in listed):
            entry.unlink(missing_ok=True)


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
        root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.folder = root / FEATURES_FOLDER / f"{safe_name}-{key}"
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_file = self.folder / SETTINGS_FILE
        if not settings_file.exists():
            atomic_write_json(settings_file, settings)
        self._shards: dict = {}   # shard name -> opened _Shard (memory maps stay valid after a merge deletes the files)

    # ------------------------------------------------------------------ index

    def _open(self, name: str, meta: dict) -> _Shard:
        if name not in self._shards:
            arrays = [np.load(f, mmap_mode="r") for f in _shard_files(self.folder, name, meta["levels"])]
            if any(a.shape[0] != len(meta["hashes"]) for a in arrays):
                raise ValueError(f"{len(meta['hashes'])} images listed, arrays of {[a.shape[0] for a in arrays]} rows")
            self._shards[name] = _Shard(arrays, {h: r for r, h in enumerate(meta["hashes"])},
                                        {h: tuple(s) for h, s in zip(meta["hashes"], meta["shapes"])})
        return self._shards[name]

    def _locate(self, digests: Sequence[str]) -> dict:
        """sha256 -> (shard, row) for the ``digests`` found in the cache; damaged shards are dropped (warning).

        Under the folder's lock: another process (a rank of the same torchrun job) may merge the shards, which
        deletes the files the index lists. Read and memory-mapped under the lock, they stay readable afterwards
        (a map outlives the file's name)."""
        with _locked(self.folder):
            shards = _read_index(self.folder)
            index_file = self.folder / INDEX_FILE
            if index_file.exists():
                os.utime(index_file)   # "last used", for `rlr cache clear --older-than`
            where = {}
            for name, meta in shards.items():
                for digest in meta["hashes"]:
                    where.setdefault(digest, name)
            found, damaged = {}, {}
            for digest in dict.fromkeys(digests):
                name = where.get(digest)
                if name is None or name in damaged:
                    continue
                try:
                    shard = self._open(name, shards[name])
                except (OSError, ValueError, KeyError, TypeError) as err:
                    damaged[name] = err
                    continue
                found[digest] = (shard, shard.rows[digest])
            if damaged:
                self._drop(shards, damaged)
        return found

    def _drop(self, shards: dict, damaged: dict) -> None:
        """Remove the ``damaged`` shards from the index ``shards`` (call under ``_locked``)."""
        for name in damaged:
            warnings.warn(f"feature cache shard {self.folder / name}.l*.npy is damaged ({damaged[name]}): "
                          f"dropped, its {len(shards[name]['hashes'])} images are recomputed", CacheWarning,
                          stacklevel=4)
            del shards[name]
        _write_index(self.folder, shards)

    # ------------------------------------------------------------------ public

    def features(self, paths: Sequence[str], description: str = "features") -> FeatureTable:
        """Tokens of ``paths`` (in order), computing and caching the images not cached yet."""
        paths = [str(p) for p in paths]
        digests = [file_digest(p) for p in paths]
        found = self._locate(digests)
        missing = {}
        for path, digest in zip(paths, digests):
            if digest not in found and digest not in missing:
                missing[digest] = path
        if missing:
            self._compute_shard(list(missing.items()), description)
            found = self._locate(digests)
        levels = len(self.extractor.channels)
        locations = [found[d] for d in digests]
        shapes = [loc[0].shapes[d] for loc, d in zip(locations, digests)]
        return FeatureTable(paths, digests, locations, shapes, levels)

    @torch.no_grad()
    def _compute_shard(self, items: list, description: str) -> None:
        name = uuid.uuid4().hex
        size = self.extractor.input_size
        count = len(items)
        finals = _shard_files(self.folder, name, len(self.extractor.channels))
        tmp_files = [temporary_sibling(f) for f in finals]
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
            for array in arrays:
                array.flush()
            del arrays
            meta = {"levels": len(finals), "hashes": [d for d, _ in items], "shapes": shapes,
                    "files": [p for _, p in items]}
            with _locked(self.folder):
                for tmp, final in zip(tmp_files, finals):
                    publish(tmp, final)
                shards = _read_index(self.folder)
                shards[name] = meta
                if len(shards) > MAX_SHARDS:
                    shards = self._merge(shards)
                _write_index(self.folder, shards)
        finally:
            for tmp in tmp_files:
                tmp.unlink(missing_ok=True)

    def _merge(self, shards: dict) -> dict:
        """All readable shards as one new shard (call under the lock); unreadable ones are dropped (warning)."""
        parts, hashes, shapes, files = [], [], [], []
        for name, meta in shards.items():
            try:
                shard = self._open(name, meta)
            except (OSError, ValueError, KeyError, TypeError) as err:
                warnings.warn(f"feature cache shard {self.folder / name}.l*.npy is damaged ({err}): dropped while "
                              f"merging", CacheWarning, stacklevel=4)
                continue
            parts.append(shard.arrays)
            hashes += meta["hashes"]
            shapes += meta["shapes"]
            files += meta["files"]
        name = uuid.uuid4().hex
        finals = _shard_files(self.folder, name, len(self.extractor.channels))
        for level, final in enumerate(finals):
            tmp = temporary_sibling(final)
            try:
                first = parts[0][level]
                merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=first.dtype,
                                                   shape=(len(hashes), *first.shape[1:]))
                row = 0
                for arrays in parts:
                    merged[row:row + len(arrays[level])] = arrays[level]
                    row += len(arrays[level])
                merged.flush()
                del merged
                publish(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        return {name: {"levels": len(finals), "hashes": hashes, "shapes": shapes, "files": files}}


# ---------------------------------------------------------------------- `rlr cache`

@dataclass
class CacheEntry:
    """One settings folder of the feature cache."""

    folder: Path
    backbone: str
    input_size: Optional[int]
    images: int
    shards: int
    bytes: int
    last_used: float   # seconds since the epoch


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def cache_entries(cache_dir=None) -> list:
    """The feature cache's settings folders under ``cache_dir`` (default: ``default_cache_dir()``), largest first."""
    root = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / FEATURES_FOLDER
    entries = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir():
            continue
        try:
            settings = json.loads((folder / SETTINGS_FILE).read_text())
        except (OSError, ValueError):
            settings = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CacheWarning)
            shards = _read_index(folder)
        files = [f for f in folder.iterdir() if f.is_file()]
        index = folder / INDEX_FILE
        last_used = index.stat().st_mtime if index.exists() else max((f.stat().st_mtime for f in files), default=0.0)
        entries.append(CacheEntry(folder, str(settings.get("backbone", "?")), settings.get("input_size"),
                                  len({h for meta in shards.values() for h in meta["hashes"]}), len(shards),
                                  _folder_size(folder), last_used))
    return sorted(entries, key=lambda e: -e.bytes)


def clear_cache(cache_dir=None, older_than_days: Optional[float] = None) -> list:
    """Delete the settings folders (all, or those not used for ``older_than_days``); returns the removed entries."""
    if older_than_days is not None and not older_than_days >= 0:
        raise ValueError(f"--older-than must be a number of days >= 0, got {older_than_days!r}")
    now = time.time()
    removed = []
    for entry in cache_entries(cache_dir):
        if older_than_days is None or now - entry.last_used > older_than_days * 86400:
            shutil.rmtree(entry.folder)
            removed.append(entry)
    return removed


def format_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
