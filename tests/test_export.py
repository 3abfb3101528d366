"""rlr.export: one ONNX graph whose scores and maps equal `rlr predict`'s under onnxruntime."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _pipeline import make_dataset, tiny_config
from rlr.export import ExportError, WindowedAttention, export
from rlr.predict import predict
from rlr.train import train

import rlr_kernels

pytestmark = pytest.mark.timm   # trains or loads the lite0 backbone: timm, which imports torchvision

USAGE = Path(__file__).resolve().parents[1] / "docs" / "usage.md"
IMAGE_SIZE = (80, 72)   # not the model's 64 x 64: the graph's Lanczos resize is part of the check


@pytest.fixture(scope="module", params=["paper", "standardized", "log-standardized"])
def exported(tmp_path_factory, request):
    """A run exported with each scoring (a standardising one's statistics are constants of the graph)."""
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("export")
    make_dataset(root / "data")
    train(root / "run", root / "data", tiny_config(holdout=0.2, scoring=request.param), cache_dir=root / "cache",
          progress=False, log=lambda *_: None)
    images = root / "images"
    images.mkdir()
    for path in sorted((root / "data").glob("*/test/*/*.png")):
        resized = Image.open(path).convert("RGB").resize(IMAGE_SIZE[::-1], Image.BICUBIC)
        resized.save(images / f"{path.parent.parent.parent.name}_{path.parent.name}_{path.name}")
    export(root / "run", root / "model.onnx", image_size=IMAGE_SIZE, log=lambda *_: None)
    return root


@pytest.mark.parametrize("grid, window", [((4, 4), 3), ((5, 7), 3), ((6, 6), 5)])
def test_standard_operator_attention_equals_the_reference_kernels(grid, window):
    torch.manual_seed(0)
    length = grid[0] * grid[1]
    q, v = torch.randn(2, 2, length, 8), torch.randn(2, 2, length, 8)
    k_ref, v_ref = torch.randn(3, 2, length, 8), torch.randn(3, 2, length, 8)
    ops = WindowedAttention(grid, window)
    expected = rlr_kernels.local_reference_attention(q, k_ref, v_ref, grid=grid, window=window, backend="reference")
    torch.testing.assert_close(ops.local(q, k_ref, v_ref), expected, rtol=1e-5, atol=1e-5)
    expected = rlr_kernels.masked_key_attention(q, k_ref[0], v, grid=grid, window=window, backend="reference")
    torch.testing.assert_close(ops.masked(q, k_ref[0], v), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("height, width, size", [(80, 72, 64), (300, 250, 256), (100, 200, 256), (256, 300, 256)])
def test_graph_resize_is_pils_lanczos_bit_for_bit(height, width, size):
    from rlr.backbone import resize_image
    from rlr.export import _resize_passes, lanczos_matrix, pil_vertical_first

    image = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1).double()[None]
    ours = _resize_passes(x, lanczos_matrix(height, size), lanczos_matrix(width, size).T,
                          pil_vertical_first(height, width, size))
    np.testing.assert_array_equal(ours[0].permute(1, 2, 0).numpy(), resize_image(image, size))


def test_onnxruntime_scores_and_maps_equal_rlr_predict(exported, tmp_path):
    import onnx
    import onnxruntime as ort

    model = onnx.load(exported / "model.onnx")
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}                 # standard operators only
    assert not any(n.op_type in ("Loop", "Scan") for n in model.graph.node)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["rlr.threshold"])["source"] == "holdout"
    assert json.loads(meta["rlr.config"])["input_size"] == 64
    assert [o.name for o in model.graph.output] == ["score", "anomaly_map"]

    paths = sorted(str(p) for p in (exported / "images").iterdir())
    rows = predict(exported / "run", paths, tmp_path / "pred", save_maps="npy", overlays=False, progress=False,
                   log=lambda *_: None)
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).transpose(0, 3, 1, 2)
    scores, maps = session.run(None, {"image": batch[:3]})          # dynamic batch: 3, then the rest
    more_scores, more_maps = session.run(None, {"image": batch[3:]})
    scores, maps = np.concatenate([scores, more_scores]), np.concatenate([maps, more_maps])
    expected = np.array([r.score for r in rows])
    # Relative to the largest score: standardised scores can lie near 0, where a relative error says nothing.
    assert np.max(np.abs(scores - expected)) / np.max(np.abs(expected)) < 1e-4
    from rlr.inference import load

    det = load(exported / "run")
    model_maps = np.stack([r.anomaly_map for r in det.predict(paths, map_size="model")])
    assert np.max(np.abs(maps - model_maps)) / np.max(np.abs(model_maps)) < 1e-4


def test_openvino_ir_scores_equal_rlr_predict(exported, tmp_path):
    ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install openvino; the test extra has it)")
    xml = export(exported / "run", tmp_path / "ir" / "model.xml", format="openvino", image_size=IMAGE_SIZE,
                 log=lambda *_: None)
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert sorted(p.name for p in xml.parent.iterdir()) == ["model.bin", "model.xml"]   # no temporary left
    core = ov.Core()
    model = core.read_model(str(xml))
    assert json.loads(model.get_rt_info(["rlr", "threshold"]).astype(str))["source"] == "holdout"
    assert json.loads(model.get_rt_info(["rlr", "input"]).astype(str))["height"] == IMAGE_SIZE[0]
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})   # bf16 by default on AMX CPUs
    paths = sorted(str(p) for p in (exported / "images").iterdir())
    rows = predict(exported / "run", paths, tmp_path / "pred", overlays=False, progress=False, log=lambda *_: None)
    batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]).transpose(0, 3, 1, 2)
    outputs = compiled.create_infer_request().infer({0: batch})
    scores = outputs[compiled.output("score")]
    expected = np.array([r.score for r in rows])
    assert np.max(np.abs(scores - expected)) / np.max(np.abs(expected)) < 1e-4
    with pytest.raises(ExportError, match=r"give --out NAME.xml"):
        export(exported / "run", tmp_path / "model.onnx", format="openvino")


def test_usage_example_runs_with_onnxruntime_alone_and_prints_what_rlr_predict_prints(exported, tmp_path):
    text = USAGE.read_text()
    code = re.search(r"<!-- onnx-example -->\n```python\n(.*?)```", text, re.S).group(1)
    script = tmp_path / "example.py"
    script.write_text("import sys\nsys.modules['torch'] = None\nsys.modules['rlr'] = None\n" + code)
    paths = sorted(str(p) for p in (exported / "images").iterdir())[:4]
    printed = subprocess.run([sys.executable, str(script), str(exported / "model.onnx"), *paths],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    from rlr.cli import main

    capture = tmp_path / "cli.txt"
    with open(capture, "w") as handle, pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", handle)
        assert main(["predict", "--run", str(exported / "run"), *paths, "--out", str(tmp_path / "pred"),
                     "--no-overlays", "--quiet"]) == 0
    expected = [line for line in capture.read_text().splitlines() if "  score " in line]
    assert len(printed) == len(expected) == 4
    for ours, theirs in zip(printed, expected):
        a, b = ours.split(), theirs.split()
        assert a[0] == b[0] and a[-1] == b[-1]                        # path and label
        assert float(a[2]) == pytest.approx(float(b[2]), rel=1e-4)    # score
        assert float(a[4]) == pytest.approx(float(b[4]), abs=1e-3)    # normalised score


def test_export_errors_are_named(tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(ExportError, match="unsupported export format 'tflite'; rlr exports onnx, openvino"):
        export(tmp_path, tmp_path / "m", format="tflite")
    with pytest.raises(ExportError, match="opset 11 is too old"):
        export(tmp_path, tmp_path / "m.onnx", opset=11)
    (tmp_path / "run").mkdir()
    from rlr.config import RLRConfig

    RLRConfig().save(tmp_path / "run")
    with pytest.raises(ExportError, match="no checkpoint"):
        export(tmp_path / "run", tmp_path / "m.onnx")
