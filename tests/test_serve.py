"""rlr/serve.py: the HTTP API (same numbers as rlr.load), its limits and errors, the batching queue, and the
inspection page driven in a real headless Chromium."""
import asyncio
import base64
import io
import json
import os
import shutil
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import rlr_kernels
from PIL import Image

from _pipeline import make_dataset, tiny_config
from rlr.inference import load
from rlr.serve import (LOOPBACK_NAMES, BatchingWorker, RequestError, ServeSettings, batch_bucket, create_app,
                       default_allowed_hosts, host_allowed, is_loopback, running_server)
from rlr.train import train

pytestmark = pytest.mark.timm   # trains or loads the lite0 backbone: timm, which imports torchvision

starlette_testclient = pytest.importorskip("starlette.testclient")
LOCAL = "http://127.0.0.1"   # the in-process clients' Host: one the server answers to


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = make_dataset(root / "data")
    run = root / "run"
    train(run, data, tiny_config(holdout=0.2), cache_dir=root / "cache", progress=False, log=lambda *a: None)
    images = sorted((data / "fabric" / "test").rglob("*.png"))
    return run, images


@pytest.fixture(scope="module")
def detector(served):
    return load(served[0], device="cpu")


@pytest.fixture()
def client(detector):
    with starlette_testclient.TestClient(create_app(detector, run_name="run"), base_url=LOCAL) as c:
        yield c


def _files(paths):
    return [("file", (p.name, p.read_bytes(), "image/png")) for p in paths]


def test_health_and_info(client, detector):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/info").json()
    assert info["backbone"] == detector.config.backbone
    assert info["classes"] == ["fabric", "washer"]
    assert info["threshold"] == pytest.approx(detector.cut().threshold)
    assert set(info["class_thresholds"]) <= {"fabric", "washer"}
    assert info["device"] == "cpu" and info["backend"] in rlr_kernels.available_backends("cpu")


def test_predict_gives_the_api_numbers(client, detector, served):
    paths = served[1][:3]
    response = client.post("/predict?raw=1", files=_files(paths))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = detector.predict([str(p) for p in paths])
    assert [r["filename"] for r in results] == [p.name for p in paths]
    for got, want, path in zip(results, expected, paths):
        assert got["score"] == pytest.approx(want.score, rel=1e-6)
        assert got["label"] == want.label
        assert got["normalized_score"] == pytest.approx(want.normalized_score, rel=1e-6)
        raw = got["anomaly_map"]
        heat = np.frombuffer(base64.b64decode(raw["data"]), dtype="<f4").reshape(raw["shape"])
        np.testing.assert_allclose(heat, want.anomaly_map, rtol=1e-5, atol=1e-6)
        with Image.open(path) as image:
            assert (got["width"], got["height"]) == image.size
        header, png = got["overlay"].split(",", 1)
        assert header == "data:image/png;base64"
        with Image.open(io.BytesIO(base64.b64decode(png))) as overlay:
            assert overlay.size == (2 * got["width"], got["height"])   # image beside its heat map


def test_overlay_can_be_left_out(client, served):
    result = client.post("/predict?overlay=0", files=_files(served[1][:1])).json()["results"][0]
    assert "overlay" not in result and "anomaly_map" not in result


@pytest.mark.parametrize("request_kwargs, status, words", [
    (dict(json={"file": "x"}), 415, "multipart/form-data"),
    (dict(files=[("image", ("a.png", b"\x89PNG...", "image/png"))]), 422, "no 'file' field"),
    (dict(files=[("file", ("notes.txt", b"not an image at all", "text/plain"))]), 415, "notes.txt"),
    (dict(files=[("file", ("a.png", b"\x89PNG\r\n\x1a\nbroken", "image/png"))]), 415, "could not be read as a PNG"),
    (dict(files=[("file", ("x." + "e" * 300, b"\x89PNG", "image/png"))]), 422, "file name of 302 characters"),
    (dict(files=[("file", ("empty.png", b"", "image/png"))]), 422, "empty.png"),
    (dict(files={"file": (None, b"just text")}), 422, "file upload"),
])
def test_bad_requests_are_named_4xx(client, request_kwargs, status, words):
    response = client.post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_too_large_and_bad_flags(detector, served):
    settings = ServeSettings(max_file_mb=0.001, max_files=2)
    with starlette_testclient.TestClient(create_app(detector, settings), base_url=LOCAL) as small:
        response = small.post("/predict", files=_files(served[1][:1]))
        assert response.status_code == 413 and "limit of 0.001 MB per file" in response.json()["detail"]
    with starlette_testclient.TestClient(create_app(detector, ServeSettings(max_files=2)), base_url=LOCAL) as few:
        response = few.post("/predict", files=_files(served[1][:3]))
        assert response.status_code == 413 and "more than 2 files" in response.json()["detail"]
        response = few.post("/predict?raw=maybe", files=_files(served[1][:1]))
        assert response.status_code == 400 and "'raw'" in response.json()["detail"]
        assert few.get("/predict").status_code == 405
        assert few.get("/nothing-here").status_code == 404


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _eps() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 10), (200, 10, 10)).save(buffer, format="EPS")   # PIL writes EPS without Ghostscript
    return buffer.getvalue()


def test_only_allowed_formats_reach_a_decoder(client, monkeypatch):
    """An EPS file (PIL would run Ghostscript on it) is refused from its first bytes: no PIL plugin opens it."""
    from PIL import EpsImagePlugin

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append(1))
    response = client.post("/predict", files=[("file", ("tiny.eps", _eps(), "application/postscript"))])
    assert response.status_code == 415, response.text
    assert "not a PNG, JPEG, BMP or TIFF image" in response.json()["detail"] and not opened


def test_each_file_gets_its_own_result_or_error(client, served, detector):
    good = served[1][:2]
    files = [_files(good[:1])[0], ("file", ("garbage.png", b"\x00garbage", "image/png")), _files(good[1:2])[0]]
    response = client.post("/predict?overlay=0", files=files)
    assert response.status_code == 200, response.text
    first, bad, last = response.json()["results"]
    assert bad == {"filename": "garbage.png",
                   "error": "file 'garbage.png' is not a PNG, JPEG, BMP or TIFF image (no other format is read)"}
    expected = detector.predict([str(p) for p in good])
    assert [first["score"], last["score"]] == pytest.approx([r.score for r in expected], rel=1e-6)


def test_raw_maps_are_made_only_when_asked_and_keep_the_score(client, served, monkeypatch):
    import rlr.inference

    resized, real = [], rlr.inference.resize_map
    monkeypatch.setattr(rlr.inference, "resize_map", lambda heat, shape: resized.append(shape) or real(heat, shape))
    paths = served[1][:2]
    assert client.post("/predict", files=_files(paths)).status_code == 200
    assert resized == []        # no full-resolution map for an answer that does not send one
    results = client.post("/predict?raw=1&overlay=0", files=_files(paths)).json()["results"]
    assert len(resized) == 2
    for result in results:
        raw = result["anomaly_map"]
        heat = np.frombuffer(base64.b64decode(raw["data"]), dtype="<f4").reshape(raw["shape"])
        assert float(heat.max()) == pytest.approx(result["score"], rel=1e-7)   # label and map agree


def test_host_and_origin_are_checked(detector, served):
    app = create_app(detector, ServeSettings(allowed_hosts=("inspect.example", "*.plant.example")))
    with starlette_testclient.TestClient(app, base_url="http://inspect.example:8000") as named:
        assert named.get("/health").status_code == 200
        assert named.get("/health", headers={"Host": "line3.plant.example"}).status_code == 200
        refused = named.get("/health", headers={"Host": "evil.example"})
        assert refused.status_code == 421 and "evil.example" in refused.json()["detail"]
        assert named.post("/predict", files=_files(served[1][:1]),
                          headers={"Origin": "http://inspect.example:8000"}).status_code == 200
        cross = named.post("/predict", files=_files(served[1][:1]), headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403 and "another site" in cross.json()["detail"]
    with starlette_testclient.TestClient(create_app(detector), base_url="http://localhost") as local:
        assert local.get("/info").status_code == 200
        assert local.get("/info", headers={"Host": "rebound.example:8000"}).status_code == 421


def test_default_allowed_hosts():
    assert set(default_allowed_hosts("127.0.0.1")) == {"localhost", "127.0.0.1", "::1"}
    assert "192.0.2.7" in default_allowed_hosts("192.0.2.7")
    wildcard = default_allowed_hosts("0.0.0.0")
    assert "localhost" in wildcard and socket.gethostname().lower() in wildcard
    assert host_allowed("[::1]:8000", LOOPBACK_NAMES) and host_allowed("LOCALHOST:1", LOOPBACK_NAMES)
    assert not host_allowed("", LOOPBACK_NAMES) and not host_allowed("localhost.evil.example", LOOPBACK_NAMES)
    assert host_allowed("anything.example", ("*",))


def test_memory_budget_refuses_early(detector):
    """An image whose decoding alone needs more than the budget is refused from its header (413), before
    decoding; a budget others hold answers 503; what a request held is given back."""
    settings = ServeSettings(request_memory_mb=4)
    big = _png(np.zeros((600, 700, 3), np.uint8))   # a small file, 0.42 MP: ~6 MB to decode
    app = create_app(detector, settings)
    with starlette_testclient.TestClient(app, base_url=LOCAL) as small:
        response = small.post("/predict", files=[("file", ("big.png", big, "image/png"))])
        assert response.status_code == 413 and "--request-memory-mb" in response.json()["detail"]
        budget = app.app.state.budget
        assert budget.held == 0
        budget.try_take(budget.limit - 1000)      # as if other requests held all but 1000 bytes
        response = small.post("/predict", files=[("file", ("tiny.png", _png(np.zeros((8, 8, 3), np.uint8)),
                                                           "image/png"))])
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        budget.give(budget.limit - 1000)
        assert budget.held == 0 and small.get("/health").json()["held_mb"] == 0


def test_image_over_max_pixels_is_its_own_error(detector):
    with starlette_testclient.TestClient(create_app(detector, ServeSettings(max_pixels=1000)), base_url=LOCAL) as c:
        response = c.post("/predict", files=[("file", ("wide.png", _png(np.zeros((20, 60, 3), np.uint8)), "image/png")),
                                             ("file", ("ok.png", _png(np.zeros((20, 20, 3), np.uint8)), "image/png"))])
        assert response.status_code == 200
        wide, ok = response.json()["results"]
        assert "60x20 px, over the limit of 1,000 pixels" in wide["error"]
        assert "score" in ok


def test_internal_errors_say_nothing_of_the_exception(detector, served, monkeypatch):
    def broken(images, **kwargs):
        raise RuntimeError("secret internal detail /opt/model")

    monkeypatch.setattr(detector, "predict", broken)
    with starlette_testclient.TestClient(create_app(detector), base_url=LOCAL) as c:
        response = c.post("/predict", files=_files(served[1][:1]))
    assert response.status_code == 500 and "secret" not in response.text and "RuntimeError" not in response.text


def test_serve_loads_the_detector_with_max_batch(monkeypatch, served):
    import uvicorn

    import rlr.inference
    from rlr.serve import serve

    seen = {}
    real_load = rlr.inference.load
    monkeypatch.setattr(rlr.inference, "load", lambda *a, **kw: seen.update(kw) or real_load(*a, **kw))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    serve(served[0], device="cpu", settings=ServeSettings(max_batch=4), log=lambda *a: None)
    assert seen["batch_size"] == 4 and seen["app"].allowed == tuple(sorted(LOOPBACK_NAMES))


def test_merged_jobs_are_split_into_padded_batches_of_max_batch():
    sizes = []

    def predict(images):
        sizes.append(len(images))
        return list(images)

    async def scenario():
        worker = BatchingWorker(predict, ServeSettings(max_batch=4, batch_wait_ms=0))
        await worker.start()
        result = await worker.submit(list(range(11)))
        await worker.stop()
        return result

    assert asyncio.run(scenario()) == list(range(11))
    assert sizes == [4, 4, 4]          # 11 images: 4 + 4 + 3 padded to 4, never a batch over max_batch


def test_queue_full_answers_503_and_requests_are_batched():
    gate, batches = threading.Event(), []

    def predict(images):
        gate.wait(10)
        batches.append(len(images))
        return list(images)

    async def scenario():
        worker = BatchingWorker(predict, ServeSettings(max_queue=2, max_batch=8, batch_wait_ms=50))
        await worker.start()
        first = asyncio.create_task(worker.submit([1]))
        await asyncio.sleep(0.05)                     # the worker holds the first request at the gate
        waiting = [asyncio.create_task(worker.submit([n, n])) for n in (2, 3)]
        await asyncio.sleep(0.05)
        with pytest.raises(RequestError) as refused:
            await worker.submit([4])
        gate.set()
        results = await asyncio.gather(first, *waiting)
        await worker.stop()
        return refused.value, results

    refused, results = asyncio.run(scenario())
    assert refused.status == 503 and "busy" in refused.detail
    assert results == [[1], [2, 2], [3, 3]]            # every request gets its own images back, in order
    assert batches == [1, 4]                           # the two waiting requests ran as one batch


def test_batches_are_padded_to_few_shapes():
    assert [batch_bucket(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert batch_bucket(5, 6) == 6 and batch_bucket(3, 6) == 4
    with pytest.raises(ValueError):
        batch_bucket(7, 6)


def test_loopback_rule():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_queue"):
        ServeSettings(max_queue=0)


# ------------------------------------------------------------------------------------------- a real server, probed

HOSTILE_LIMITS = ("--device", "cpu", "--max-file-mb", "12", "--max-files", "4", "--request-memory-mb", "16")
BOUNDARY = "rlrTestBoundary7f3a"


@pytest.fixture(scope="module")
def hostile_server(served):
    """`python -m rlr serve` from this checkout, on a free loopback port, with small limits."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1])] + sys.path))
    with running_server(served[0], extra_args=HOSTILE_LIMITS, env=env) as process:
        yield process


def _address(server):
    host, port = server.url.rstrip("/").rsplit("/", 1)[1].rsplit(":", 1)
    return host, int(port)


def _part(name: str, data: bytes, field: str = "file") -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"


def _body(files) -> bytes:
    return b"".join(_part(name, data) for name, data in files) + f"--{BOUNDARY}--\r\n".encode()


def _request(server, body: bytes, host: str = None, path: str = "/predict?overlay=0", timeout: float = 60):
    """(status, JSON answer) of a POST through http.client, with the Host header given."""
    import http.client

    address, port = _address(server)
    connection = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        connection.request("POST", path, body=body, headers={
            "Host": host or f"{address}:{port}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _stream_until_answered(server, head: bytes, chunks, limit_seconds: float = 60):
    """Send ``head`` then ``chunks`` on a raw socket until the server answers (or the chunks end, or the time is up):
    (status, JSON answer, body bytes sent). Reads the answer as soon as there is one, as a browser or curl does."""
    import select

    sock = socket.create_connection(_address(server), timeout=limit_seconds)
    try:
        sock.sendall(head)
        sock.setblocking(False)
        sent, deadline, pending = 0, time.monotonic() + limit_seconds, b""
        try:
            while time.monotonic() < deadline:
                readable, writable, _ = select.select([sock], [sock], [], 5)
                if readable:
                    break
                if writable:
                    if not pending:
                        pending = next(chunks, None)
                        if pending is None:
                            break
                    done = sock.send(pending)
                    sent, pending = sent + done, pending[done:]
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(limit_seconds)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except ConnectionResetError:   # the server closes a connection whose body it did not read
            pass
        head_text, _, payload = answer.partition(b"\r\n\r\n")
        return int(head_text.split()[1]), json.loads(payload), sent
    finally:
        sock.close()


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 1 << 60


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _health(server) -> dict:
    with urllib.request.urlopen(server.url + "health", timeout=10) as answer:
        return json.loads(answer.read())


def _no_internal_text(detail: str) -> None:
    for word in ("Traceback", "Error:", "Errno", "/tmp/", "Ghostscript", "exception"):
        assert word not in detail, detail


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the server's memory from /proc")
def test_chunked_upload_is_refused_while_it_is_read(hostile_server):
    """256 MB of one file sent chunked (no Content-Length): 413 once the 12 MB per-file limit is crossed, the rest
    never read; the server's memory stays put."""
    before = _rss_mb(hostile_server.pid)
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
            f"\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    part = _part("big.png", b"")[:-2]
    block = b"\x89PNG" + bytes(2**16 - 4)

    def chunks():
        yield b"%x\r\n" % len(part) + part + b"\r\n"
        for _ in range(256 * 16):     # 256 MB in 64 KB chunks
            yield b"%x\r\n" % len(block) + block + b"\r\n"

    status, answer, sent = _stream_until_answered(hostile_server, head, chunks())
    assert status == 413 and "over the limit of 12 MB per file" in answer["detail"], answer
    assert sent < 64 * 2**20                          # answered long before the 256 MB were sent
    assert _rss_mb(hostile_server.pid) - before < 64
    assert _health(hostile_server)["held_mb"] == 0


def test_hostile_requests_get_named_4xx_answers(hostile_server, served):
    good = served[1][0].read_bytes()
    status, answer = _request(hostile_server, _body([("tiny.eps", _eps())]))
    assert status == 415 and "not a PNG, JPEG, BMP or TIFF image" in answer["detail"]
    _no_internal_text(answer["detail"])
    status, answer = _request(hostile_server, _body([("good.png", good)]), host="evil.example")
    assert status == 421 and "evil.example" in answer["detail"]
    status, answer = _request(hostile_server, _body([("x." + "p" * 300, good)]))
    assert 400 <= status < 500 and "file name of 302 characters" in answer["detail"]
    _no_internal_text(answer["detail"])
    status, answer = _request(hostile_server, _body([("a.png", good), ("junk.png", b"\x00" * 50), ("b.png", good)]))
    assert status == 200
    first, junk, last = answer["results"]
    assert first["score"] == pytest.approx(last["score"]) and "score" not in junk
    assert junk["filename"] == "junk.png" and "not a PNG" in junk["error"]
    _no_internal_text(junk["error"])


def test_a_request_that_would_overfill_memory_is_refused_early(hostile_server):
    """One upload holds 10 of the server's 16 MB while its body is still arriving: a second request is answered
    503 as soon as its bytes would go over, and what the first held is given back when its client goes away."""
    first = socket.create_connection(_address(hostile_server), timeout=60)
    try:
        payload = _part("slow.png", bytes(10 * 2**20))
        first.sendall((f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                       f"boundary={BOUNDARY}\r\nContent-Length: {len(payload) + 1000}\r\n\r\n").encode() + payload)
        deadline = time.monotonic() + 60
        while _health(hostile_server)["held_mb"] < 9.9:
            assert time.monotonic() < deadline, _health(hostile_server)
            time.sleep(0.2)
        body = _body([("second.png", b"\x89PNG" + bytes(7 * 2**20))])
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                f"boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        status, answer, _ = _stream_until_answered(hostile_server, head,
                                                    iter([body[i:i + 2**16] for i in range(0, len(body), 2**16)]))
        assert status == 503 and "retry shortly" in answer["detail"]
    finally:
        first.close()
    deadline = time.monotonic() + 30
    while _health(hostile_server)["held_mb"] or _health(hostile_server)["in_progress"]:
        assert time.monotonic() < deadline, _health(hostile_server)
        time.sleep(0.2)


# ------------------------------------------------------------------------------------------- a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture()
def server(served):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1])] + sys.path))
    with running_server(served[0], extra_args=("--device", "cpu"), env=env) as process:
        yield process.url


def _chromium_or_skip():
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install playwright)"
    else:
        reason = None if CHROMIUM else "no chromium on PATH (apt-get install chromium)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)


def test_page_in_a_real_browser(server, served, detector, tmp_path):
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    paths = []
    for kind in ("good", "hole"):     # distinct names: the cards are matched by file name
        source = next(p for p in served[1] if p.parent.name == kind)
        paths.append(tmp_path / f"{kind}.png")
        paths[-1].write_bytes(source.read_bytes())
    expected = detector.predict([str(p) for p in paths])
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server)
            page.wait_for_selector("body[data-ready='1']")
            assert "threshold" in page.inner_text("#model")
            page.set_input_files("#files", [str(p) for p in paths])
            page.wait_for_function("document.querySelectorAll('.result img').length === 2", timeout=60_000)
            page.wait_for_function("Array.from(document.querySelectorAll('.result img')).every(i => i.complete "
                                   "&& i.naturalWidth > 0)")
            cards = page.query_selector_all(".result")
            shown = {c.get_attribute("data-name"): (float(c.get_attribute("data-score")), c.get_attribute("data-label"))
                     for c in cards}
            for path, want in zip(paths, expected):
                score, label = shown[path.name]
                assert score == pytest.approx(want.score, rel=1e-6)
                assert label == ("anomalous" if want.label else "normal")
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)

            def labels_at(value):
                page.eval_on_selector("#threshold", "(el, v) => { el.value = String(v); "
                                      "el.dispatchEvent(new Event('input', {bubbles: true})); }", value)
                return sorted(c.get_attribute("data-label") for c in page.query_selector_all(".result"))

            low = min(p.score for p in expected)
            high = max(p.score for p in expected)
            assert labels_at(low * 0.5) == ["anomalous", "anomalous"]     # relabelled without a new request
            assert labels_at(high * 1.05) == ["normal", "normal"]
            assert page.get_attribute("body", "data-requests") == "1"
        finally:
            browser.close()
    assert (tmp_path / "serve.png").stat().st_size > 10_000
