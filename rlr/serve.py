"""`rlr serve`: an inspection page and an HTTP endpoint over a trained run.

    GET  /          the inspection page (plain HTML/JS shipped with the package; works offline)
    GET  /health    {"status": "ok", "queued": N}
    GET  /info      model, backbone, classes, threshold(s), device, backend, input size
    POST /predict   multipart/form-data, field ``file`` (repeatable) -> {"results": [...]}, one object per
                    image: filename, score, normalized_score, label, class, width, height, and
                    ``overlay`` (a PNG data URL: the image beside its heat map; ``?overlay=0`` leaves it
                    out) and, with ``?raw=1``, ``anomaly_map`` ({"shape", "dtype", "data": base64 of the
                    little-endian float32 map at the image's own resolution}).

Requests that arrive together are scored as one batch by a single inference worker (torch uses
all cores inside one batch; several workers would only fight over them). The queue in front of it
is bounded: when it is full the server answers 503 at once instead of holding the images in
memory. Bad requests get a 4xx whose ``detail`` names the problem.

Scoring goes through :mod:`rlr.inference` (the same code as ``rlr predict`` and ``rlr.load``), so
the numbers are the API's. Nothing here imports the trainer.
"""
from __future__ import annotations

import asyncio
import base64
import io
import contextlib
import ipaddress
import socket
import subprocess
import sys
import tempfile
import threading
import time
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


@dataclass
class ServeSettings:
    """Limits of one server; defaults suit one inspection station on a CPU."""

    max_batch: int = 16              # images scored together at most
    max_queue: int = 64              # requests waiting at most; one more is answered 503
    batch_wait_ms: float = 5.0       # how long the worker waits for more requests to fill a batch
    max_file_mb: float = 25.0        # per uploaded file
    max_files: int = 32              # per request
    max_pixels: int = 50_000_000     # per decoded image (PIL's decompression-bomb guard is 89 MP)

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_files", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_file_mb <= 0 or self.batch_wait_ms < 0:
            raise ValueError("max_file_mb must be positive and batch_wait_ms not negative")


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


def decode_upload(name: str, data: bytes, settings: ServeSettings) -> np.ndarray:
    """Bytes of one uploaded file -> HxWx3 uint8 RGB, or a RequestError naming the file."""
    from .data import DatasetError, load_image

    if len(data) == 0:
        raise RequestError(422, f"file {name!r} is empty")
    if len(data) > settings.max_file_mb * 2**20:
        raise RequestError(413, f"file {name!r} is {len(data) / 2**20:.1f} MB, over the limit of "
                                f"{settings.max_file_mb:g} MB per file")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Exception:  # noqa: BLE001 - whatever PIL says, it is not an image we can read
        raise RequestError(415, f"file {name!r} is not an image PIL can read (PNG, JPEG, BMP, TIFF, ...)") from None
    if width * height > settings.max_pixels:
        raise RequestError(413, f"image {name!r} is {width}x{height} px, over the limit of "
                                f"{settings.max_pixels:,} pixels")
    # Through a file, so that uploads decode exactly as `rlr predict` decodes files (one home for
    # colour modes, bit depths and EXIF orientation); the suffix picks the same fallbacks.
    with tempfile.NamedTemporaryFile(suffix=Path(name).suffix.lower() or ".png") as spool:
        spool.write(data)
        spool.flush()
        try:
            return load_image(spool.name)
        except DatasetError as err:
            raise RequestError(415, str(err).replace(spool.name, repr(name))) from None


def overlay_png(image: np.ndarray, heat: np.ndarray, vmin: float, vmax: float) -> str:
    """Data URL of a PNG: the image beside the heat map over it, longest side at most OVERLAY_SIDE."""
    from .predict import overlay

    height, width = image.shape[:2]
    scale = min(1.0, OVERLAY_SIDE / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        heat = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    buffer = io.BytesIO()
    Image.fromarray(overlay(image, heat, vmin, vmax)).save(buffer, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def colour_range(heat: np.ndarray, threshold: Optional[float]) -> tuple:
    """Heat-map colours: with a threshold, 0 .. 2·threshold (the threshold sits mid-scale, so colours
    compare across images and requests); without one, the image's own min .. max."""
    if threshold is not None and threshold > 0:
        return 0.0, 2.0 * threshold
    return float(heat.min()), float(heat.max())


def batch_bucket(count: int, max_batch: int) -> int:
    """The batch size ``count`` images are padded to: the next power of two, at most ``max_batch``
    (a larger request is left as it is: the detector splits it into its own batches)."""
    if count >= max_batch:
        return count
    return min(1 << (count - 1).bit_length(), max_batch)


class BatchingWorker:
    """One inference thread fed by a bounded queue; requests that wait together form one batch."""

    def __init__(self, predict_batch, settings: ServeSettings):
        self.predict_batch = predict_batch          # list of HxWx3 uint8 -> list of results
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
            images = [image for job_images, _ in jobs for image in job_images]
            # Batches are padded to a power of two (repeating the last image, whose extra results are
            # dropped): torch's CPU kernels keep buffers per input shape, and a server that saw every
            # batch size from 1 to max_batch would hold them all; five shapes bound its memory.
            padded = images + images[-1:] * (batch_bucket(len(images), self.settings.max_batch) - len(images))
            try:
                results = (await loop.run_in_executor(self.executor, self.predict_batch, padded))[:len(images)]
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
        "precision": detector.scorer.precision, "backbone_runtime": detector.extractor.runtime,
    }


def _page() -> str:
    return resources.files("rlr").joinpath("serve_page/index.html").read_text(encoding="utf-8")


def create_app(detector, settings: Optional[ServeSettings] = None, *, run_name: str = ""):
    """The Starlette application serving ``detector`` (an :class:`rlr.inference.Detector`)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    settings = settings or ServeSettings()
    worker = BatchingWorker(lambda images: detector.predict(images), settings)
    lock = threading.Lock()
    page = _page()

    info = dict(describe_detector(detector), run=run_name, max_batch=settings.max_batch,
                max_queue=settings.max_queue, max_file_mb=settings.max_file_mb, max_files=settings.max_files)
    threshold = info["threshold"]

    async def index(request: Request):
        return HTMLResponse(page)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "queued": worker.queued})

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
        raise RequestError(400, f"query parameter {name!r} must be 0 or 1, got {value!r}")

    async def read_files(request: Request) -> list:
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise RequestError(415, f"POST /predict takes multipart/form-data with one or more 'file' fields, "
                                    f"got content type {content_type or 'none'!r}")
        file_limit = int(settings.max_file_mb * 2**20)
        body_limit = file_limit * settings.max_files + 2**20     # plus room for the multipart headers
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > body_limit:
            raise RequestError(413, f"request body of {int(declared) / 2**20:.1f} MB is over the limit of "
                                    f"{body_limit / 2**20:g} MB ({settings.max_files} files of "
                                    f"{settings.max_file_mb:g} MB)")
        try:
            form = await request.form(max_files=settings.max_files, max_fields=settings.max_files,
                                      max_part_size=file_limit)
        except Exception as err:  # noqa: BLE001 - multipart parser errors are the client's
            if "maximum size" in str(err):
                raise RequestError(413, f"a file is over the limit of {settings.max_file_mb:g} MB per file") from None
            raise RequestError(400, f"could not read the multipart body: {err}") from None
        uploads = form.getlist("file")
        others = sorted({key for key in form.keys() if key != "file"})
        if not uploads:
            found = f"; fields found: {others}" if others else ""
            raise RequestError(422, f"no 'file' field in the form (send each image as a field named 'file'){found}")
        files = []
        for upload in uploads:
            if isinstance(upload, str):
                raise RequestError(422, "field 'file' must be a file upload, not a text value")
            files.append((upload.filename or f"image{len(files) + 1}", await upload.read()))
            await upload.close()
        return files

    async def predict(request: Request):
        try:
            want_overlay = flag(request, "overlay", True)
            want_raw = flag(request, "raw", False)
            files = await read_files(request)
            loop = asyncio.get_running_loop()
            images = await loop.run_in_executor(None, lambda: [decode_upload(n, d, settings) for n, d in files])
            results = await worker.submit(images)
        except RequestError as err:
            return JSONResponse({"detail": err.detail}, status_code=err.status)
        payload = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [describe(name, image, result, want_overlay, want_raw)
                           for (name, _), image, result in zip(files, images, results)])
        return JSONResponse({"results": payload})

    def describe(name, image, result, want_overlay, want_raw) -> dict:
        heat = np.asarray(result.anomaly_map, dtype=np.float32)
        item = {"filename": name, "score": float(result.score),
                "normalized_score": None if result.normalized_score is None else float(result.normalized_score),
                "label": result.label, "class": None,
                "width": int(image.shape[1]), "height": int(image.shape[0])}
        if want_overlay:
            with lock:   # matplotlib's colormap lookup is cheap but not documented thread-safe
                item["overlay"] = overlay_png(image, heat, *colour_range(heat, threshold))
        if want_raw:
            item["anomaly_map"] = {"shape": list(heat.shape), "dtype": "float32",
                                   "data": base64.b64encode(heat.astype("<f4").tobytes()).decode("ascii")}
        return item

    async def on_error(request: Request, exc: Exception):
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    async def not_allowed(request: Request, exc: Exception):
        status = getattr(exc, "status_code", 405)
        return JSONResponse({"detail": f"{request.method} {request.url.path}: {getattr(exc, 'detail', '')}"},
                            status_code=status)

    routes = [Route("/", index), Route("/health", health), Route("/info", get_info),
              Route("/predict", predict, methods=["POST"])]
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await worker.start()
        try:
            yield
        finally:
            await worker.stop()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: not_allowed, Exception: on_error})
    app.state.worker = worker
    return app


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
          precision: str = "fp32", settings: Optional[ServeSettings] = None, log=print, runtime: str = "fast") -> None:
    """Load ``run_dir`` and serve it until interrupted."""
    import uvicorn

    from .inference import load

    detector = load(run_dir, device=device, backend=backend, precision=precision, runtime=runtime)
    app = create_app(detector, settings, run_name=Path(run_dir).name)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    if not is_loopback(host):
        log(f"rlr serve: listening on {host}, reachable from other machines (no authentication)")
    log(f"rlr serve: {Path(run_dir)} on {where} (Ctrl+C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
