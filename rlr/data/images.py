"""Reading images and ground-truth masks into the arrays the pipeline uses.

    load_image(path) -> uint8 (H, W, 3) RGB
    load_mask(path, size, image_shape=None) -> bool (size, size)

Every decoding problem becomes a :class:`DatasetError` that names the file, so a bad file in a
data set of thousands is found at once.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ORIENTATION_TAG = 0x0112   # EXIF orientation


class DatasetError(ValueError):
    """A data set problem; the message names the file or folder and what was expected."""


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files directly inside ``folder`` (by extension, hidden files skipped), sorted by name."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and is_image_file(p))


def _to_uint8(array: np.ndarray, path: str) -> np.ndarray:
    """Scale any integer or float pixel type to uint8 (16-bit: v * 255 / 65535, rounded)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # PIL reads 16-bit files as int32 ("I") or uint16 ("I;16"): both hold 0..65535.
        wide = np.clip(array.astype(np.int64), 0, 65535)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise DatasetError(f"{path}: image holds NaN or infinite pixel values")
        # Float images in [0, 1] are the usual convention; anything larger is read as 0..255.
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    raise DatasetError(f"{path}: unsupported pixel type {array.dtype}")


def _decode(path: str) -> np.ndarray:
    """Decode a file to a numpy array in its native depth (2-D, or 3-D channel-last)."""
    if not os.path.exists(path):
        raise DatasetError(f"image file not found: {path}")
    if not os.path.isfile(path):
        raise DatasetError(f"{path} is not a file")
    try:
        with Image.open(path) as image:
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
        raise DatasetError(f"cannot read image {path}: {error} (PIL's decompression-bomb limit; for a trusted file "
                           f"raise it: PIL.Image.MAX_IMAGE_PIXELS = None, see docs/data.md)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        pil_error = error
    # PIL cannot decode some valid TIFFs (e.g. 16-bit RGB); tifffile (a scikit-image dependency) can.
    if path.lower().endswith((".tif", ".tiff")):
        try:
            import tifffile

            array = tifffile.imread(path)
            if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                array = np.moveaxis(array, 0, -1)  # planar (C, H, W) storage
            return array
        except Exception:  # noqa: BLE001 - any failure means the file is unreadable
            pass
    raise DatasetError(f"cannot read image {path}: corrupt or unsupported file ({pil_error})")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 (H, W, 3) RGB.

    png/jpg/jpeg/bmp/tif/tiff; grayscale is replicated to 3 channels, an alpha channel is dropped
    (as PIL's ``convert("RGB")`` and OpenCV do), palette and CMYK images are converted to RGB,
    16-bit and float images are scaled to 0..255, an EXIF orientation is applied (upright).
    """
    path = os.fspath(path)
    array = _decode(path)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    elif array.ndim == 3 and array.shape[-1] == 2:  # gray + alpha
        array = np.repeat(array[..., :1], 3, axis=-1)
    elif array.ndim == 3 and array.shape[-1] == 4:  # RGBA
        array = array[..., :3]
    elif not (array.ndim == 3 and array.shape[-1] == 3):
        raise DatasetError(f"{path}: expected a grayscale, RGB or RGBA image, got array shape {array.shape}")
    return np.ascontiguousarray(_to_uint8(array, path))


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
    array = _decode(path)
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
