"""rlr/serve.py: the HTTP API (same numbers as rlr.load), its limits and errors, the batching queue, and the
inspection page driven in a real headless Chromium."""
import asyncio
import base64
import io
import os
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import rlr_kernels
from PIL import Image

from _pipeline import make_dataset, tiny_config
from rlr.inference import load
from rlr.serve import (BatchingWorker, RequestError, ServeSettings, batch_bucket, create_app, is_loopback,
                       running_server)
from rlr.train import train

pytestmark = pytest.mark.timm   # trains or loads the lite0 backbone: timm, which imports torchvision

starlette_testclient = pytest.importorskip("starlette.testclient")


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
    with starlette_testclient.TestClient(create_app(detector, run_name="run")) as c:
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
    (dict(files=[("file", ("empty.png", b"", "image/png"))]), 422, "empty.png"),
    (dict(files={"file": (None, b"just text")}), 422, "file upload"),
])
def test_bad_requests_are_named_4xx(client, request_kwargs, status, words):
    response = client.post("/predict", **request_kwargs)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_too_large_and_bad_flags(detector, served):
    settings = ServeSettings(max_file_mb=0.001, max_files=2)
    with starlette_testclient.TestClient(create_app(detector, settings)) as small:
        response = small.post("/predict", files=_files(served[1][:1]))
        assert response.status_code == 413 and "limit of 0.001 MB per file" in response.json()["detail"]
    with starlette_testclient.TestClient(create_app(detector, ServeSettings(max_files=2))) as few:
        assert few.post("/predict", files=_files(served[1][:3])).status_code == 400
        response = few.post("/predict?raw=maybe", files=_files(served[1][:1]))
        assert response.status_code == 400 and "'raw'" in response.json()["detail"]
        assert few.get("/predict").status_code == 405
        assert few.get("/nothing-here").status_code == 404


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
    assert [batch_bucket(n, 16) for n in (1, 2, 3, 5, 8, 9, 16, 40)] == [1, 2, 4, 8, 8, 16, 16, 40]
    assert batch_bucket(7, 6) == 7 and batch_bucket(5, 6) == 6


def test_loopback_rule():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.0.2.7")


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_queue"):
        ServeSettings(max_queue=0)


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
