"""Reading images and ground-truth masks into the arrays the pipeline uses.

    load_image(path_or_file) -> uint8 (H, W, 3) RGB
    image_info(path_or_file) -> width, height, format, decode cost, from the header alone
    load_mask(path, size, image_shape=None) -> bool (size, size)
    find_images(folder) -> image files below a folder, with their paths relative to it

Only the formats of IMAGE_FORMATS are ever decoded (PNG, JPEG, BMP, TIFF): a file is recognised by
its first bytes before any decoder runs, and PIL is asked for those plugins alone. Whatever else PIL
can open (EPS, which runs Ghostscript; PSD, ICNS, ...) is refused by name: `rlr serve`, `rlr
predict`, the data loaders and the feature cache all read images here.

Every decoding problem becomes a :class:`DatasetError` that names the file, so a bad file in a
data set of thousands is found at once.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# PIL format names of the decoders rlr runs, and the first bytes of each (JPEG covers MPO camera files;
# BigTIFF is TIFF with version 43).
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"BM", "BMP"),
               (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"))
SIGNATURE_BYTES = 8
FORMATS_TEXT = "PNG, JPEG, BMP or TIFF"
ORIENTATION_TAG = 0x0112   # EXIF orientation
FLOAT_ROWS = 256           # rows of a float image scaled at once

ImageSource = Union[str, os.PathLike, BinaryIO]   # a path, or a seekable binary file object (an upload)


class DatasetError(ValueError):
    """A data set problem; the message names the file or folder and what was expected."""


class ImageFileError(DatasetError):
    """An image file that cannot be used. ``reason``: "missing", "unsupported" (not an allowed format:
    refused before any decoder ran), "corrupt" (an allowed format that does not decode) or "too_large"
    (PIL's decompression-bomb limit); ``format`` the recognised format, if any."""

    def __init__(self, message: str, reason: str, format: Optional[str] = None):
        super().__init__(message)
        self.reason, self.format = reason, format


def sniff_format(head: bytes) -> Optional[str]:
    """The IMAGE_FORMATS name of a file from its first bytes, or None for anything else."""
    return next((name for signature, name in _SIGNATURES if head.startswith(signature)), None)


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files directly inside ``folder`` (by extension, hidden files skipped), sorted by name."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and is_image_file(p))


def find_images(folder: str | os.PathLike, skip: Sequence[str | os.PathLike] = ()) -> list[tuple[str, str]]:
    """(path, path relative to ``folder``) of every image file below ``folder``, subfolders included, sorted by
    relative path. Hidden files and folders are skipped, and so are the folders of ``skip`` (e.g. outputs inside it);
    linked folders are followed once (a link back up the tree is not walked again)."""
    folder = Path(folder)
    skipped = {os.path.realpath(s) for s in skip}
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen or real in skipped:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = os.path.join(top, name)
            if is_image_file(name) and os.path.isfile(path):
                found.append((path, os.path.relpath(path, folder)))
    return sorted(found, key=lambda item: Path(item[1]).parts)


def _source_name(source: ImageSource, name: Optional[str]) -> str:
    if name is not None:
        return name
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "<image>")


@contextlib.contextmanager
def _opened(source: ImageSource, name: str) -> Iterator[tuple]:
    """(binary file, format) of an allowed image; an ImageFileError naming ``name`` for anything else."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise ImageFileError(f"image file not found: {name}", "missing")
        if not os.path.isfile(path):
            raise ImageFileError(f"{name} is not a file", "missing")
        try:
            handle = open(path, "rb")
        except OSError as err:
            raise ImageFileError(f"cannot read image {name}: {err.strerror or err}", "missing") from None
        with handle:
            yield handle, _check_format(handle, name)
    else:
        source.seek(0)
        yield source, _check_format(source, name)


def _check_format(handle: BinaryIO, name: str) -> str:
    head = handle.read(SIGNATURE_BYTES)
    handle.seek(0)
    found = sniff_format(head)
    if found is None:
        what = "an empty file" if not head else f"not a {FORMATS_TEXT} file"
        raise ImageFileError(f"cannot read image {name}: {what} (rlr decodes these formats only)", "unsupported")
    return found


def _bomb_error(name: str, error: Exception, found: str) -> ImageFileError:
    return ImageFileError(f"cannot read image {name}: {error} (PIL's decompression-bomb limit; for a trusted file "
                          f"raise it: PIL.Image.MAX_IMAGE_PIXELS = None, see docs/data.md)", "too_large", found)


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says: its size, format and the bytes per pixel of its decoded array."""

    width: int
    height: int
    format: str
    bytes_per_pixel: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decode_bytes(self) -> int:
        """An upper bound of the memory :func:`load_image` holds at once while it decodes the image and resizes it
        (measured, peak resident memory on 20 MP files: 10 bytes per pixel for RGB PNG and JPEG, 12 RGBA PNG, 8
        16-bit PNG, 10 16-bit RGB TIFF, 19 float32 RGB TIFF; this bound: 14, 14, 14, 18, 30). PIL holds an
        image of fewer than four bytes per pixel as four (RGB) or converts it to that."""
        return self.pixels * (2 * max(self.bytes_per_pixel, 4) + 6)


def image_info(source: ImageSource, name: Optional[str] = None) -> ImageInfo:
    """:class:`ImageInfo` of an allowed image from its header, without decoding its pixels."""
    name = _source_name(source, name)
    with _opened(source, name) as (handle, found):
        if found == "TIFF":   # tifffile decodes what PIL cannot (e.g. 16-bit RGB): ask it what it would make
            with contextlib.suppress(Exception):
                import tifffile

                with tifffile.TiffFile(handle) as tiff:
                    series = tiff.series[0]
                    width, height, samples = _tiff_layout(series.shape)
                    return ImageInfo(width, height, found, samples * series.dtype.itemsize)
            handle.seek(0)
        try:
            with Image.open(handle, formats=[found]) as image:
                bands = len(image.getbands())
                per_band = 2 if image.mode.startswith("I;16") else 4 if image.mode in ("I", "F") else 1
                return ImageInfo(*image.size, found, bands * per_band)
        except Image.DecompressionBombError as error:
            raise _bomb_error(name, error, found) from None
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever a decoder raises on bad bytes, the file is unreadable
            raise ImageFileError(f"cannot read image {name}: corrupt {found} file ({error})", "corrupt",
                                 found) from None


def _tiff_layout(shape: tuple) -> tuple[int, int, int]:
    """(width, height, samples per pixel) of a TIFF series' array shape, (H, W), (H, W, C) or planar (C, H, W)."""
    shape = tuple(int(v) for v in shape)
    while len(shape) > 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 2:
        return shape[1], shape[0], 1
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        return shape[2], shape[1], shape[0]
    if len(shape) == 3:
        return shape[1], shape[0], shape[2]
    raise ValueError(f"a TIFF image of array shape {shape}")


def _decode(source: ImageSource, name: str) -> np.ndarray:
    """Decode an allowed image to a numpy array in its native depth (2-D, or 3-D channel-last)."""
    with _opened(source, name) as (handle, found):
        try:
            with Image.open(handle, formats=[found]) as image:
                image.load()
                if image.getexif().get(ORIENTATION_TAG, 1) != 1:   # a camera photo stored sideways: show it upright
                    image = ImageOps.exif_transpose(image)
                if image.mode in ("1", "L", "RGB", "RGBA", "LA", "I", "I;16", "I;16L", "I;16B", "F"):
                    array = np.asarray(image)
                elif image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                    array = np.asarray(image.convert("RGBA" if "transparency" in image.info else "RGB"))
                else:
                    array = np.asarray(image.convert("RGB"))
            return array
        except Image.DecompressionBombError as error:
            raise _bomb_error(name, error, found) from None
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever a decoder raises on bad bytes, the file is unreadable
            pil_error = error
        # PIL cannot decode some valid TIFFs (e.g. 16-bit RGB); tifffile (a scikit-image dependency) can.
        if found == "TIFF":
            try:
                import tifffile

                handle.seek(0)
                array = tifffile.imread(handle)
                if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                    array = np.moveaxis(array, 0, -1)  # planar (C, H, W) storage
                return array
            except Exception:  # noqa: BLE001 - any failure means the file is unreadable
                pass
    raise ImageFileError(f"cannot read image {name}: corrupt or unsupported {found} file ({pil_error})", "corrupt",
                         found)


def _to_uint8(array: np.ndarray, path: str) -> np.ndarray:
    """Scale any integer or float pixel type to uint8 (16-bit: v * 255 / 65535, rounded)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # PIL reads 16-bit files as int32 ("I") or uint16 ("I;16"): both hold 0..65535. In place, in
        # uint32 (65535 * 255 + 32767 fits): a 16-bit image costs no int64 copies.
        wide = np.clip(array, 0, 65535).astype(np.uint32)
        wide *= 255
        wide += 32767
        wide //= 65535
        return wide.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not all(np.isfinite(array[r:r + FLOAT_ROWS]).all() for r in range(0, len(array), FLOAT_ROWS)):
            raise DatasetError(f"{path}: image holds NaN or infinite pixel values")
        # Float images in [0, 1] are the usual convention; anything larger is read as 0..255.
        scale = 255.0 if float(array.max(initial=0.0)) <= 1.0 else 1.0
        out = np.empty(array.shape, np.uint8)
        for r in range(0, len(array), FLOAT_ROWS):   # float64 arithmetic a block of rows at a time
            values = array[r:r + FLOAT_ROWS].astype(np.float64)
            values *= scale
            out[r:r + FLOAT_ROWS] = np.clip(np.rint(values, out=values), 0, 255, out=values)
        return out
    raise DatasetError(f"{path}: unsupported pixel type {array.dtype}")


def load_image(source: ImageSource, name: Optional[str] = None) -> np.ndarray:
    """Read an image (a path, or a seekable binary file object) as uint8 (H, W, 3) RGB.

    PNG, JPEG, BMP or TIFF, recognised by content (anything else is refused before a decoder runs);
    grayscale is replicated to 3 channels, an alpha channel is dropped (as PIL's ``convert("RGB")`` and
    OpenCV do), palette and CMYK images are converted to RGB, 16-bit and float images are scaled to
    0..255, an EXIF orientation is applied (upright). ``name``: how errors name the image (default:
    its path).
    """
    path = _source_name(source, name)
    array = _decode(source, path)
    # Channels are dropped before the pixel type is scaled and gray is replicated after: a 16-bit or
    # float image costs no more memory than it must.
    if array.ndim == 3 and array.shape[-1] in (1, 2):  # gray (+ alpha)
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[-1] == 4:  # RGBA
        array = array[..., :3]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise DatasetError(f"{path}: expected a grayscale, RGB or RGBA image, got array shape {array.shape}")
    array = _to_uint8(array, path)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return np.ascontiguousarray(array)


def nearest_indices(source: int, target: int) -> np.ndarray:
    """Source index of each target index for a nearest resize with pixel centres aligned
    (PIL NEAREST, torch "nearest-exact"): i -> floor((i + 0.5) * source / target)."""
    return np.minimum(((np.arange(target) + 0.5) * (source / target)).astype(np.int64), source - 1)


def load_mask(
    path: str | os.PathLike,
    size: int,
    image_shape: tuple[int, int] | None = None,
    *,
    image_path: str | os.PathLike | None = None,
) -> np.ndarray:
    """Read a ground-truth mask as bool (size, size).

    Binarised as ``value > 0.5 * max(value)`` of the mask itself (so 0/1, 0/255 and 16-bit masks
    all work; an all-zero mask stays empty), then resized nearest with pixel centres aligned.
    Colour masks count a pixel as defective if any channel is. ``image_shape`` (H, W): the size
    of the image the mask belongs to; a mask of another size is an error (``image_path`` only
    makes that message name the image too).
    """
    path = os.fspath(path)
    if not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"load_mask: size must be a positive int, got {size!r}")
    array = _decode(path, path)
    if array.ndim == 3:
        if array.shape[-1] in (2, 4):  # drop alpha
            array = array[..., :-1]
        array = array.max(axis=-1)
    if array.ndim != 2:
        raise DatasetError(f"{path}: expected a 2-D mask image, got array shape {array.shape}")
    if image_shape is not None:
        image_shape = tuple(int(v) for v in image_shape[:2])
        if tuple(array.shape) != image_shape:
            where = f" ({os.fspath(image_path)})" if image_path is not None else ""
            raise DatasetError(
                f"mask {path} is {array.shape[0]}x{array.shape[1]} (HxW) but its image{where} is "
                f"{image_shape[0]}x{image_shape[1]}: a mask must have its image's size"
            )
    values = array.astype(np.float64) if array.dtype != bool else array
    peak = values.max(initial=0)
    binary = values > 0.5 * peak if peak > 0 else np.zeros(array.shape, dtype=bool)
    rows = nearest_indices(binary.shape[0], size)
    cols = nearest_indices(binary.shape[1], size)
    return np.ascontiguousarray(binary[rows[:, None], cols[None, :]])
