"""`rlr serve`: an inspection page and an HTTP endpoint over a trained run.

    GET  /          the inspection page (plain HTML/JS shipped with the package; works offline)
    GET  /health    {"status": "ok", "queued": N, "in_progress": N, "held_mb": X}
    GET  /info      model, backbone, classes, threshold(s), device, backend, input size, limits
    POST /predict   multipart/form-data, field ``file`` (repeatable) -> {"results": [...]}, one object per
                    file, in order: filename, score, normalized_score, label, class, width, height, and
                    ``overlay`` (a PNG data URL: the image beside its heat map; ``?overlay=0`` leaves it
                    out) and, with ``?raw=1``, ``anomaly_map`` ({"shape", "dtype", "data": base64 of the
                    little-endian float32 map at the image's own resolution}); or, for a file that could
                    not be used, filename and ``error`` (the other files are still scored).

Requests that arrive together are scored as one batch by a single inference worker (torch uses
all cores inside one batch; several workers would only fight over them). What the server holds is
bounded and over-limit requests are refused early, before they cost memory:

- at most ``max_queue`` requests are in progress (read, decoded, waiting or scored); one more is
  answered 503 before its body is read;
- the body is read as it arrives (chunked or not): a file over ``max_file_mb``, or more than
  ``max_files`` files, is answered 413 the moment the limit is crossed;
- every byte a request holds counts against one budget, ``request_memory_mb``: its uploaded bytes as
  they arrive, then, before anything is decoded, what decoding needs (each image's header gives its
  size and pixel type: rlr.data.ImageInfo) and what its answer will hold; a request the budget
  cannot cover now is answered 503, one that could never fit 413;
- an image is decoded only when its first bytes say PNG, JPEG, BMP or TIFF (rlr.data), and it is
  shrunk to the model's input size (and the overlay's) at once: what waits for the worker is small;
- the ``Host`` header must name this server (``allowed_hosts``), against DNS rebinding, and a
  browser request from another origin (an ``Origin`` header that is not this server) is refused.

Bad requests get a 4xx whose ``detail`` names the problem; an internal failure a 500 that says only
that (the traceback goes to the server's log, never into an answer). No authentication: see
docs/serve.md, "Security".

Scoring goes through :mod:`rlr.inference` (the same code as ``rlr predict`` and ``rlr.load``), so
the numbers are the API's. Nothing here imports the trainer.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
OVERLAY_SIDE = 512          # longest side of the overlay PNG sent back (the raw map keeps full size)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
MAX_NAME_CHARS = 255        # longest file name taken (what file systems allow)
BODY_IDLE_SECONDS = 30.0    # a request body that sends nothing for this long is answered 408
FORM_SLACK_BYTES = 2**20    # room for the multipart headers and non-file fields of a request
# What an image holds from its decoding until its answer is sent, in bytes per pixel: of the model's input
# (its uint8 copy and float32 map), of the overlay preview (the preview, its PNG as base64 in the JSON answer:
# measured peak 32 for previews of random noise, which PNG cannot compress), and of the image's own size with
# ?raw=1 (the float32 map, its base64 text, the JSON answer: measured peak 23 for one 2 MP map, 19 each for four).
KEPT_BYTES_PER_MODEL_PIXEL = 7
KEPT_BYTES_PER_PREVIEW_PIXEL = 36
RAW_BYTES_PER_PIXEL = 24

log = logging.getLogger("rlr.serve")


@dataclass
class ServeSettings:
    """Limits of one server; defaults suit one inspection station on a CPU."""

    max_batch: int = 16              # images scored together at most
    max_queue: int = 64              # requests in progress at most; one more is answered 503
    batch_wait_ms: float = 5.0       # how long the worker waits for more requests to fill a batch
    max_file_mb: float = 25.0        # per uploaded file
    max_files: int = 32              # per request
    max_pixels: int = 50_000_000     # per decoded image (PIL's decompression-bomb guard is 89 MP)
    request_memory_mb: float = 2048  # what all requests together may hold at once (uploads, decoding, answers)
    allowed_hosts: Optional[tuple] = None   # Host header names answered ("*" any); None: the loopback names

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_files", "max_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.max_file_mb > 0 or not self.request_memory_mb > 0 or not self.batch_wait_ms >= 0:
            raise ValueError("max_file_mb and request_memory_mb must be positive and batch_wait_ms not negative")
        if self.allowed_hosts is not None:
            self.allowed_hosts = tuple(h.strip().lower().rstrip(".") for h in self.allowed_hosts if h.strip())
            if not self.allowed_hosts:
                raise ValueError("allowed_hosts names no host (use '*' to answer any Host header)")

    @property
    def file_limit(self) -> int:
        return int(self.max_file_mb * 2**20)

    @property
    def body_limit(self) -> int:
        return self.file_limit * self.max_files + FORM_SLACK_BYTES


class RequestError(Exception):
    """A client error: answered with ``status`` and ``detail``, never a traceback."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(host: str) -> tuple:
    """The Host header names a server bound to ``host`` answers by default: the loopback names, the address it
    is bound to, and for a wildcard address (0.0.0.0, ::) this machine's name and addresses. Names clients use
    beyond these (a DNS name, a reverse proxy's) are given with --allowed-hosts."""
    names = set(LOOPBACK_NAMES)
    bind = host.strip("[]").lower()
    if bind not in ("0.0.0.0", "::", ""):
        names.add(bind)
        return tuple(sorted(names))
    with contextlib.suppress(OSError):
        hostname = socket.gethostname().lower()
        names.add(hostname)
        names.update(info[4][0].lower() for info in socket.getaddrinfo(hostname, None))
    with contextlib.suppress(OSError):   # the address of the default route's interface (connecting UDP sends nothing)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            names.add(probe.getsockname()[0])
    return tuple(sorted(names))


def _host_name(host_header: str) -> str:
    """The name of a Host header, without its port: 'a.example:8000' -> 'a.example', '[::1]:80' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return (host.rsplit(":", 1)[0] if host.count(":") == 1 else host).rstrip(".")


def host_allowed(host_header: str, allowed: tuple) -> bool:
    name = _host_name(host_header)
    return bool(name) and any(pattern == "*" or name == pattern
                              or (pattern.startswith("*.") and name.endswith(pattern[1:])) for pattern in allowed)


def _origin_netloc(scheme: str, netloc: str) -> str:
    default = {"http": ":80", "https": ":443"}.get(scheme)
    netloc = netloc.lower()
    return netloc[:-len(default)] if default and netloc.endswith(default) else netloc


def same_origin(origin: str, host_header: str) -> bool:
    """Whether a browser's Origin header names the server its Host header names (scheme's default port aside)."""
    parts = urllib.parse.urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return _origin_netloc(parts.scheme, parts.netloc) == _origin_netloc(parts.scheme, host_header.strip())


class HostCheck:
    """ASGI middleware, before anything else runs: a Host header the server does not answer to is refused
    (421), and so is a request whose Origin header is another site (403): a page elsewhere that a browser on
    this machine has open cannot use the server."""

    def __init__(self, app, allowed: tuple):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {key.lower(): value.decode("latin-1") for key, value in scope["headers"]}
            host = headers.get(b"host", "")
            refusal = None
            if not host_allowed(host, self.allowed):
                refusal = (421, f"this server does not answer to host {_host_name(host)[:100]!r} (it answers "
                                f"{', '.join(self.allowed)}; rlr serve --allowed-hosts adds names)")
            elif b"origin" in headers and not same_origin(headers[b"origin"], host):
                refusal = (403, "requests from another site's page are refused (the Origin header is not this "
                                "server)")
            if refusal is not None:
                body = json.dumps({"detail": refusal[1]}).encode()
                await send({"type": "http.response.start", "status": refusal[0],
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class MemoryBudget:
    """Bytes that requests hold, all together, bounded; taken before they are held, given back after."""

    def __init__(self, limit_bytes: int):
        self.limit, self.held = int(limit_bytes), 0
        self._lock = threading.Lock()

    def try_take(self, amount: int) -> bool:
        with self._lock:
            if self.held + amount > self.limit:
                return False
            self.held += amount
            return True

    def give(self, amount: int) -> None:
        with self._lock:
            self.held -= amount


class Holding:
    """What one request holds of the budget: refused with 503 when others hold too much, 413 when the request
    alone would be over the whole budget; all of it given back by ``release``."""

    def __init__(self, budget: MemoryBudget):
        self.budget, self.amount = budget, 0

    def take(self, amount: int, what: str) -> None:
        if amount <= 0:
            return
        if self.amount + amount > self.budget.limit:
            raise RequestError(413, f"{what} needs {(self.amount + amount) / 2**20:.0f} MB of server memory, over "
                                    f"the {self.budget.limit / 2**20:g} MB all requests may hold at once "
                                    f"(--request-memory-mb): send fewer or smaller images per request")
        if not self.budget.try_take(amount):
            raise RequestError(503, "the server holds as many images as it may right now; retry shortly")
        self.amount += amount

    def give(self, amount: int) -> None:
        amount = min(amount, self.amount)
        self.amount -= amount
        self.budget.give(amount)

    def release(self) -> None:
        self.give(self.amount)


# ------------------------------------------------------------------------------------------- reading the body

try:   # python-multipart >= 0.0.13 names its module python_multipart
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:   # pragma: no cover - older python-multipart
    from multipart.exceptions import FormParserError
    from multipart.multipart import MultipartParser, parse_options_header


@dataclass
class Upload:
    """One 'file' part of a request: its file name and bytes."""

    name: str
    data: bytearray


def _shown(name: str) -> str:
    """A file name as error messages quote it (a long one shortened)."""
    return repr(name if len(name) <= 80 else name[:60] + "..." + name[-12:])


class UploadReader:
    """Parses a multipart body as it arrives, enforcing the limits on every chunk (python-multipart callbacks)."""

    MAX_FIELD_BYTES = 4096      # a non-file field's value; the form carries files, not text
    MAX_HEADER_BYTES = 8192

    def __init__(self, settings: ServeSettings, holding: Holding):
        self.settings, self.holding = settings, holding
        self.uploads: list = []
        self.other_fields: set = set()
        self.text_in_file = False
        self.files = 0
        self.ended = False
        self._headers: dict = {}
        self._header_name, self._header_value = b"", b""
        self._part: Optional[dict] = None

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field,
                "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_part_data": self._data,
                "on_part_end": self._end, "on_end": self._on_end}

    def _begin(self):
        self._headers, self._part = {}, None

    def _header_field(self, data, start, end):
        self._header_name += data[start:end]
        self._check_header()

    def _header_value_cb(self, data, start, end):
        self._header_value += data[start:end]
        self._check_header()

    def _check_header(self):
        if len(self._header_name) + len(self._header_value) > self.MAX_HEADER_BYTES:
            raise RequestError(400, "a multipart part header is too long")

    def _header_end(self):
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self):
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        field_name = options.get(b"name", b"").decode("utf-8", "replace")
        is_file = b"filename" in options
        if is_file:
            self.files += 1
            if self.files > self.settings.max_files:
                raise RequestError(413, f"more than {self.settings.max_files} files in one request (--max-files)")
        wanted = field_name == "file" and is_file
        if field_name == "file" and not is_file:
            self.text_in_file = True
        elif field_name != "file":
            self.other_fields.add(field_name[:100])
        name = options.get(b"filename", b"").decode("utf-8", "replace")
        self._part = {"wanted": wanted, "file": is_file, "size": 0,
                      "upload": Upload(name or f"image{len(self.uploads) + 1}", bytearray()) if wanted else None}

    def _data(self, data, start, end):
        part = self._part
        size = end - start
        part["size"] += size
        if part["file"] and part["size"] > self.settings.file_limit:
            shown = _shown(part["upload"].name) if part["upload"] else "a file"
            raise RequestError(413, f"file {shown} is over the limit of {self.settings.max_file_mb:g} MB per file")
        if not part["file"] and part["size"] > self.MAX_FIELD_BYTES:
            raise RequestError(400, "a form field that is not a file is longer than 4 KB")
        if part["upload"] is not None:
            self.holding.take(size, "this request's upload")
            part["upload"].data += data[start:end]

    def _end(self):
        if self._part is not None and self._part["upload"] is not None:
            self.uploads.append(self._part["upload"])
        self._part = None

    def _on_end(self):
        self.ended = True


async def read_uploads(request, settings: ServeSettings, holding: Holding) -> list:
    """The 'file' parts of a multipart request, read as the body arrives; a RequestError the moment a limit is
    crossed (the rest of the body is never read)."""
    content_type = request.headers.get("content-type", "")
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise RequestError(415, f"POST /predict takes multipart/form-data with one or more 'file' fields, "
                                f"got content type {content_type[:100] or 'none'!r}")
    if b"boundary" not in options:
        raise RequestError(400, "the multipart content type names no boundary")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.body_limit:
        raise RequestError(413, f"request body of {int(declared) / 2**20:.1f} MB is over the limit of "
                                f"{settings.body_limit / 2**20:g} MB ({settings.max_files} files of "
                                f"{settings.max_file_mb:g} MB)")
    reader = UploadReader(settings, holding)
    parser = MultipartParser(options[b"boundary"], reader.callbacks())
    chunks, received = request.stream().__aiter__(), 0
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), BODY_IDLE_SECONDS)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body sent nothing for {BODY_IDLE_SECONDS:g} s") from None
        received += len(chunk)
        if received > settings.body_limit:
            raise RequestError(413, f"request body over the limit of {settings.body_limit / 2**20:g} MB "
                                    f"({settings.max_files} files of {settings.max_file_mb:g} MB)")
        try:
            parser.write(chunk)
        except FormParserError:
            raise RequestError(400, "the multipart body is malformed") from None
    if not reader.ended:
        raise RequestError(400, "the multipart body ended before its closing boundary")
    if reader.text_in_file:
        raise RequestError(422, "field 'file' must be a file upload, not a text value")
    if not reader.uploads:
        found = f"; fields found: {sorted(reader.other_fields)}" if reader.other_fields else ""
        raise RequestError(422, f"no 'file' field in the form (send each image as a field named 'file'){found}")
    return reader.uploads


# ------------------------------------------------------------------------------------------- decoding

@dataclass
class Decoded:
    """An upload ready to score: the image at the model's input size, its preview for the overlay, its size."""

    name: str
    small: np.ndarray
    preview: Optional[np.ndarray]
    width: int
    height: int


@dataclass
class Failed:
    """An upload that could not be used: its status and why."""

    name: str
    status: int
    error: str


def _preview(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    scale = min(1.0, OVERLAY_SIDE / max(height, width))
    if scale == 1.0:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def _file_error(name: str, error) -> Failed:
    """A rlr.data.ImageFileError of an upload as its answer: the reason in our words, no decoder's text."""
    shown = _shown(name)
    if error.reason == "unsupported":
        return Failed(name, 415, f"file {shown} is not a PNG, JPEG, BMP or TIFF image (no other format is read)")
    if error.reason == "too_large":
        return Failed(name, 413, f"image {shown} has more pixels than the decoder's safety limit")
    return Failed(name, 415, f"file {shown} could not be read as a {error.format or 'image'} image (corrupt or "
                             f"truncated?)")


def inspect_upload(upload: Upload, settings: ServeSettings):
    """An upload's rlr.data.ImageInfo from its header, or a Failed naming the file."""
    from .data import ImageFileError, image_info

    name = upload.name
    if len(name) > MAX_NAME_CHARS:
        return Failed(name, 422, f"file name of {len(name)} characters, over the limit of {MAX_NAME_CHARS}")
    if not upload.data:
        return Failed(name, 422, f"file {_shown(name)} is empty")
    try:
        info = image_info(io.BytesIO(upload.data), name=name)
    except ImageFileError as error:
        return _file_error(name, error)
    except Exception:  # noqa: BLE001 - MemoryError aside, whatever a decoder raises on hostile bytes is the file's
        log.warning("reading the header of upload %r failed", name[:100], exc_info=True)
        return Failed(name, 415, f"file {_shown(name)} could not be read as an image")
    if info.pixels > settings.max_pixels:
        return Failed(name, 413, f"image {_shown(name)} is {info.width}x{info.height} px, over the limit of "
                                 f"{settings.max_pixels:,} pixels")
    return info


def kept_bytes(info, input_size: int, want_overlay: bool, want_raw: bool) -> int:
    """What an image holds from its decoding until its answer is sent (see KEPT_BYTES_PER_*)."""
    kept = KEPT_BYTES_PER_MODEL_PIXEL * input_size ** 2
    if want_overlay:
        kept += KEPT_BYTES_PER_PREVIEW_PIXEL * min(info.pixels, OVERLAY_SIDE ** 2)
    if want_raw:
        kept += RAW_BYTES_PER_PIXEL * info.pixels
    return kept


def decode_upload(upload: Upload, input_size: int, want_overlay: bool):
    """An upload decoded and shrunk at once (Decoded), or a Failed naming it."""
    from .backbone import resize_image
    from .data import ImageFileError, load_image

    try:
        image = load_image(io.BytesIO(upload.data), name=upload.name)
    except ImageFileError as error:
        return _file_error(upload.name, error)
    except ValueError:   # rlr.data.DatasetError: decoded, but not an image rlr can use (pixel type, shape)
        return Failed(upload.name, 415, f"file {_shown(upload.name)} holds pixels rlr cannot use (a grayscale, RGB "
                                        f"or RGBA image of 8 or 16 bits per channel, or float, is expected)")
    height, width = image.shape[:2]
    return Decoded(upload.name, resize_image(image, input_size), _preview(image) if want_overlay else None,
                   width, height)


def overlay_png(preview: np.ndarray, heat: np.ndarray, vmin: float, vmax: float) -> str:
    """Data URL of a PNG: the preview image beside the heat map (any size, resized to it) over it."""
    from .predict import overlay

    height, width = preview.shape[:2]
    if heat.shape != (height, width):
        heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
    buffer = io.BytesIO()
    Image.fromarray(overlay(preview, heat, vmin, vmax)).save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def colour_range(heat: np.ndarray, threshold: Optional[float]) -> tuple:
    """Heat-map colours: with a threshold, 0 .. 2·threshold (the threshold sits mid-scale, so colours
    compare across images and requests); without one, the image's own min .. max."""
    if threshold is not None and threshold > 0:
        return 0.0, 2.0 * threshold
    return float(heat.min()), float(heat.max())


def batch_bucket(count: int, max_batch: int) -> int:
    """The batch size ``count`` images (at most ``max_batch``) are padded to: the next power of two, at most
    ``max_batch``."""
    if not 1 <= count <= max_batch:
        raise ValueError(f"a batch holds 1 to {max_batch} images, got {count}")
    return min(1 << (count - 1).bit_length(), max_batch)


class BatchingWorker:
    """One inference thread fed by a bounded queue; requests that wait together form one batch."""

    def __init__(self, predict_batch, settings: ServeSettings):
        self.predict_batch = predict_batch          # list of model-size uint8 images -> list of results
        self.settings = settings
        self.queue: Optional[asyncio.Queue] = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlr-infer")
        self.task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.settings.max_queue)
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, images: list) -> list:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((images, future))
        except asyncio.QueueFull:
            raise RequestError(503, f"the server is busy ({self.settings.max_queue} requests waiting); "
                                    f"retry shortly") from None
        return await future

    async def _score(self, images: list) -> list:
        """Results of ``images`` in forward passes of at most max_batch images each, each padded to a power of
        two (repeating its last image, whose extra results are dropped): torch's CPU kernels keep buffers per
        input shape, and a server that saw every batch size from 1 to max_batch would hold them all; a few
        shapes bound its memory."""
        loop, step, results = asyncio.get_running_loop(), self.settings.max_batch, []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            padded = chunk + chunk[-1:] * (batch_bucket(len(chunk), step) - len(chunk))
            results += (await loop.run_in_executor(self.executor, self.predict_batch, padded))[:len(chunk)]
        return results

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            count = len(jobs[0][0])
            deadline = loop.time() + self.settings.batch_wait_ms / 1000
            while count < self.settings.max_batch:
                try:
                    job = self.queue.get_nowait() if loop.time() >= deadline else await asyncio.wait_for(
                        self.queue.get(), max(deadline - loop.time(), 0))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                jobs.append(job)
                count += len(job[0])
            try:
                results = await self._score([image for job_images, _ in jobs for image in job_images])
            except Exception as err:  # noqa: BLE001 - handed to every waiting request
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(err)
                continue
            start = 0
            for job_images, future in jobs:
                if not future.done():
                    future.set_result(results[start:start + len(job_images)])
                start += len(job_images)


def describe_detector(detector) -> dict:
    """What GET /info tells: the model, its classes, the stored thresholds, where it runs."""
    from rlr_kernels.dispatch import resolve_backend

    config, checkpoint = detector.config, detector.run.checkpoint
    stored = detector.threshold
    classes = list(checkpoint.get("data", {}).get("classes", []))
    return {
        "backbone": config.backbone, "input_size": detector.input_size, "classes": classes,
        "out_indices": list(config.out_indices), "epochs_trained": checkpoint.get("epoch"),
        "threshold": None if stored is None else stored.cut().threshold,
        "class_thresholds": {} if stored is None else {c: cut.threshold for c, cut in stored.classes.items()},
        "threshold_source": None if stored is None else stored.source,
        "device": str(detector.device), "backend": resolve_backend(config.backend, detector.device),
        "precision": detector.scorer.precision,
    }


def _page() -> str:
    return resources.files("rlr").joinpath("serve_page/index.html").read_text(encoding="utf-8")


def create_app(detector, settings: Optional[ServeSettings] = None, *, run_name: str = ""):
    """The ASGI application serving ``detector`` (an :class:`rlr.inference.Detector`): Starlette routes behind
    :class:`HostCheck`."""
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    settings = settings or ServeSettings()
    worker = BatchingWorker(lambda images: detector.predict(images, map_size="model"), settings)
    budget = MemoryBudget(settings.request_memory_mb * 2**20)
    in_progress = [0]
    lock = threading.Lock()
    page = _page()
    size = detector.input_size

    info = dict(describe_detector(detector), run=run_name, max_batch=settings.max_batch,
                max_queue=settings.max_queue, max_file_mb=settings.max_file_mb, max_files=settings.max_files,
                max_pixels=settings.max_pixels, request_memory_mb=settings.request_memory_mb)
    threshold = info["threshold"]

    async def index(request: Request):
        return HTMLResponse(page)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "queued": worker.queued, "in_progress": in_progress[0],
                             "held_mb": round(budget.held / 2**20, 3)})

    async def get_info(request: Request):
        return JSONResponse(info)

    def flag(request: Request, name: str, default: bool) -> bool:
        value = request.query_params.get(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise RequestError(400, f"query parameter {name!r} must be 0 or 1, got {value[:20]!r}")

    def prepare(uploads: list, holding: Holding, want_overlay: bool, want_raw: bool) -> list:
        """Each upload as Decoded or Failed. What decoding and the answer need is taken from the budget before
        the first image is decoded; each upload's bytes are given back once it is decoded."""
        checked = [inspect_upload(upload, settings) for upload in uploads]
        usable = [item for item in checked if not isinstance(item, Failed)]
        if usable:
            decoding = max(item.decode_bytes for item in usable)
            kept = sum(kept_bytes(item, size, want_overlay, want_raw) for item in usable)
            holding.take(decoding + kept, f"decoding {len(usable)} image(s) and answering")
        else:
            decoding = 0
        prepared = []
        for upload, item in zip(uploads, checked):
            if not isinstance(item, Failed):
                item = decode_upload(upload, size, want_overlay)
            holding.give(len(upload.data))
            upload.data = bytearray()
            prepared.append(item)
        holding.give(decoding)
        return prepared

    def describe(item: Decoded, result, want_overlay: bool, want_raw: bool) -> dict:
        heat = np.asarray(result.anomaly_map, dtype=np.float32)   # at the model's input size
        answer = {"filename": item.name, "score": float(result.score),
                  "normalized_score": None if result.normalized_score is None else float(result.normalized_score),
                  "label": result.label, "class": None, "width": item.width, "height": item.height}
        if want_overlay:
            with lock:   # matplotlib's colormap lookup is cheap but not documented thread-safe
                answer["overlay"] = overlay_png(item.preview, heat, *colour_range(heat, threshold))
        if want_raw:
            from .inference import resize_map

            full = resize_map(heat, (item.height, item.width))   # keeps the peak: its max is the score
            answer["anomaly_map"] = {"shape": [item.height, item.width], "dtype": "float32",
                                     "data": base64.b64encode(full.astype("<f4").tobytes()).decode("ascii")}
        return answer

    async def predict(request: Request):
        holding = Holding(budget)
        if in_progress[0] >= settings.max_queue:
            return JSONResponse({"detail": f"the server is busy ({settings.max_queue} requests in progress); retry "
                                           f"shortly"}, status_code=503, headers={"Retry-After": "1",
                                                                                  "Connection": "close"})
        in_progress[0] += 1

        def finish():
            holding.release()
            in_progress[0] -= 1

        loop = asyncio.get_running_loop()
        try:
            want_overlay = flag(request, "overlay", True)
            want_raw = flag(request, "raw", False)
            uploads = await read_uploads(request, settings, holding)
            prepared = await loop.run_in_executor(None, prepare, uploads, holding, want_overlay, want_raw)
            decoded = [item for item in prepared if isinstance(item, Decoded)]
            results = iter(await worker.submit([item.small for item in decoded]) if decoded else [])
            answers = await loop.run_in_executor(None, lambda: [
                {"filename": item.name, "error": item.error} if isinstance(item, Failed)
                else describe(item, next(results), want_overlay, want_raw) for item in prepared])
        except RequestError as err:
            finish()
            # The body may be unread: the connection closes after the answer rather than read the rest.
            headers = {"Connection": "close", **({"Retry-After": "1"} if err.status == 503 else {})}
            return JSONResponse({"detail": err.detail}, status_code=err.status, headers=headers)
        except ClientDisconnect:
            finish()
            return JSONResponse({"detail": "the client went away"}, status_code=400)
        except Exception:  # noqa: BLE001 - logged here, never sent
            finish()
            log.exception("POST /predict failed")
            return JSONResponse({"detail": "internal error while scoring (the server's log has the details)"},
                                status_code=500)
        failed = [item for item in prepared if isinstance(item, Failed)]
        if not decoded:   # nothing usable: the request itself failed, with each file's reason
            statuses = {item.status for item in failed}
            return JSONResponse({"detail": "; ".join(item.error for item in failed[:5]), "results": answers},
                                status_code=statuses.pop() if len(statuses) == 1 else 422,
                                background=BackgroundTask(finish))
        return JSONResponse({"results": answers}, background=BackgroundTask(finish))

    async def on_error(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error (the server's log has the details)"}, status_code=500)

    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"detail": f"{request.method} {request.url.path[:200]}: {exc.detail}"},
                            status_code=exc.status_code)

    routes = [Route("/", index), Route("/health", health), Route("/info", get_info),
              Route("/predict", predict, methods=["POST"])]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: on_error})
    app.state.worker, app.state.budget = worker, budget
    return HostCheck(app, settings.allowed_hosts or LOOPBACK_NAMES)


def free_port(host: str = DEFAULT_HOST) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass
class ServerProcess:
    url: str     # base URL, ending in "/"
    pid: int


@contextlib.contextmanager
def running_server(run_dir, *, extra_args: tuple = (), timeout: float = 180.0, env: Optional[dict] = None,
                   output=subprocess.DEVNULL) -> Iterator[ServerProcess]:
    """`rlr serve` in a subprocess on a free loopback port, yielded once /health answers and stopped
    afterwards (for scripts and tests that talk to a real server)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "rlr", "serve", "--run", str(run_dir), "--port", str(port),
                                *extra_args], env=env, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://{DEFAULT_HOST}:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url + "health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(f"rlr serve --run {run_dir} exited with status {process.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rlr serve --run {run_dir} did not answer within {timeout:g} s") from None
                time.sleep(0.3)
        yield ServerProcess(url, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve(run_dir, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device=None, backend=None,
          precision: str = "fp32", settings: Optional[ServeSettings] = None, log=print) -> None:
    """Load ``run_dir`` and serve it until interrupted. ``settings.allowed_hosts`` as given, else (the default)
    those of :func:`default_allowed_hosts` for ``host``."""
    import dataclasses

    import uvicorn

    from .inference import load

    settings = settings or ServeSettings()
    if settings.allowed_hosts is None:
        settings = dataclasses.replace(settings, allowed_hosts=default_allowed_hosts(host))
    detector = load(run_dir, device=device, backend=backend, precision=precision, batch_size=settings.max_batch)
    app = create_app(detector, settings, run_name=Path(run_dir).name)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    if not is_loopback(host):
        log(f"rlr serve: listening on {host}, reachable from other machines, with NO authentication: put it behind "
            f"a reverse proxy with TLS and authentication (docs/serve.md, Security)")
    log(f"rlr serve: answers Host {', '.join(settings.allowed_hosts)} (--allowed-hosts adds names)")
    log(f"rlr serve: {Path(run_dir)} on {where} (Ctrl+C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
