"""Writes that cannot tear: the one home for every file rlr writes (checkpoints, config, metrics,
thresholds, reports, cache, exports).

A reader sees either the old file or the complete new one, never a half-written one, even if the
process is killed (SIGKILL) or the machine loses power mid-write: the data goes to a uniquely named
temporary file in the same folder, is flushed and fsynced, renamed over the target with
``os.replace`` (atomic on POSIX within one file system), and the folder is fsynced so that the
rename itself survives a power cut.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import uuid
from pathlib import Path
from typing import Callable, Iterator, Union

PathLike = Union[str, os.PathLike]

TEMP_SUFFIX = ".tmp"


def temporary_sibling(path: PathLike) -> Path:
    """A unique hidden temporary name beside ``path`` (same folder, so the rename stays atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}{TEMP_SUFFIX}")


def remove_temporaries(path: PathLike) -> None:
    """Delete the temporaries of ``path`` that killed writers left behind; only where no other writer of
    ``path`` can be running (e.g. the one process training a run folder)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def fsync_folder(folder: PathLike) -> None:
    """Persist a folder's entries (a rename) on file systems that need it; a no-op where folders can't be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: PathLike, path: PathLike) -> Path:
    """Make a temporary file written by other means (e.g. a numpy memmap) ``path``: fsync it, rename it
    over ``path``, fsync the folder."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_folder(Path(path).parent)
    return Path(path)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator:
    """Open ``path`` for writing so that it appears whole or not at all.

    ``mode`` is "w" (text) or "wb" (binary). On an exception inside the block the target is left as
    it was and the temporary file removed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    if mode == "w" and encoding is None:
        encoding = "utf-8"
    try:
        with open(tmp, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    with atomic_open(path, "w") as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def atomic_save(path: PathLike, save: Callable[[object], None]) -> Path:
    """Atomically write a file produced by ``save(file_object)``, e.g. ``lambda f: torch.save(obj, f)``."""
    with atomic_open(path, "wb") as handle:
        save(handle)
    return Path(path)
