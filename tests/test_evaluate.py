"""rlr/evaluate.py: the scoring formulas, metrics.json, the printed table, the report."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from _pipeline import make_dataset, tiny_config
from rlr.evaluate import evaluate, format_table
from rlr.inference import GaussianBlur, anomaly_maps, blur, image_scores
from rlr.metrics import METRIC_NAMES
from rlr.train import train

pytestmark = pytest.mark.timm   # the lite0 backbone: timm, which imports torchvision


def test_anomaly_map_formula():
    gen = torch.Generator().manual_seed(0)
    f = [torch.randn(2, 16, 5, generator=gen), torch.randn(2, 4, 7, generator=gen)]
    r = [torch.randn(2, 16, 5, generator=gen), torch.randn(2, 4, 7, generator=gen)]
    maps = anomaly_maps(f, r, [(4, 4), (2, 2)], 8)
    assert maps.shape == (2, 8, 8)
    expected = 0
    for fi, ri, side in zip(f, r, (4, 2)):
        token = ((fi - ri) ** 2).mean(-1) + 1 - F.cosine_similarity(fi, ri, dim=-1)
        expected = expected + F.interpolate(token.view(2, 1, side, side), size=(8, 8), mode="bilinear",
                                            align_corners=True)[:, 0]
    torch.testing.assert_close(maps, expected / 2)
    # align_corners=True: the map's corners are the corner tokens' scores exactly
    token0 = ((f[0] - r[0]) ** 2).mean(-1) + 1 - F.cosine_similarity(f[0], r[0], dim=-1)
    token1 = ((f[1] - r[1]) ** 2).mean(-1) + 1 - F.cosine_similarity(f[1], r[1], dim=-1)
    torch.testing.assert_close(maps[:, 0, 0], (token0[:, 0] + token1[:, 0]) / 2)


def test_image_score_is_max_of_sigma4_blur():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 32, 32)).astype(np.float32)
    maps[1, 5, 7] = 50.0
    expected = [gaussian_filter(m, sigma=4).max() for m in maps]
    np.testing.assert_allclose(image_scores(maps), expected, rtol=1e-6)


@pytest.mark.parametrize("shape", [(2, 1, 1), (2, 5, 5), (1, 16, 16), (3, 40, 40), (2, 20, 37), (1, 256, 256)])
def test_blur_is_scipys_gaussian_filter_at_every_size(shape):
    """The blur's matrices fold scipy's kernel and "reflect" border (repeated reflections where the map is
    narrower than the kernel's reach of 16 pixels); its sums are float32, scipy's float64."""
    maps = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
    expected = np.stack([gaussian_filter(m, sigma=4) for m in maps])
    np.testing.assert_allclose(blur(maps), expected, rtol=2e-6, atol=1e-7)
    if shape[1] == shape[2]:   # the module the exported graph and the anomalib model use
        np.testing.assert_allclose(GaussianBlur(shape[1])(torch.from_numpy(maps)).numpy(), expected, rtol=2e-6,
                                   atol=1e-7)


def test_format_table_marks_undefined_metrics():
    metrics = {"classes": {"a": {m: 0.5 for m in METRIC_NAMES}, "b": dict({m: 1.0 for m in METRIC_NAMES},
                                                                           pixel_auroc=None)},
               "mean": {m: 0.75 for m in METRIC_NAMES}}
    table = format_table(metrics)
    lines = table.splitlines()
    assert "I-AUROC" in lines[0] and "AUPRO" in lines[0]
    assert lines[2].split()[:2] == ["a", "50.00"]
    assert "-" in lines[3].split() and lines[-1].split()[:2] == ["mean", "75.00"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = make_dataset(root / "data")
    train(root / "run", data, tiny_config(epochs=1), cache_dir=root / "cache", progress=False, log=lambda *_: None)
    return root


def test_metrics_json_schema_and_report(trained):
    messages = []
    metrics = evaluate(trained / "run", cache_dir=trained / "cache", progress=False, report=True,
                       log=messages.append)
    written = json.loads((trained / "run" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert set(written) == {"classes", "mean"}
    assert set(written["classes"]) == {"fabric", "washer"}
    for values in list(written["classes"].values()) + [written["mean"]]:
        assert set(values) == set(METRIC_NAMES)
        assert all(v is None or 0 <= v <= 1 for v in values.values())
    assert written["classes"]["fabric"]["pixel_auroc"] is not None
    assert "I-AUROC" in messages[0]
    report = (trained / "run" / "report.html").read_text()
    assert "fabric" in report and "washer" in report


def test_class_without_masks_has_null_pixel_metrics(trained, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(trained / "data" / "fabric", data / "fabric")
    shutil.rmtree(data / "fabric" / "ground_truth")
    metrics = evaluate(trained / "run", data, classes=["fabric"], cache_dir=trained / "cache", progress=False,
                       log=lambda *_: None)
    values = metrics["classes"]["fabric"]
    assert values["image_auroc"] is not None
    assert all(values[m] is None for m in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"))


def test_predict_scores_match_evaluation(trained, tmp_path):
    from rlr.data import load_dataset
    from rlr.inference import Scorer, open_run
    from rlr.features import FeatureCache
    from rlr.predict import predict

    split = load_dataset(trained / "data", ["washer"])["washer"]
    paths = [s.path for s in split.test]
    run, extractor, device = open_run(trained / "run")
    table = FeatureCache(extractor, trained / "cache", progress=False).features(paths)
    cached = image_scores(Scorer(run.model, extractor, device).maps_from_tokens(table.tensors(range(len(paths)))))
    predicted = predict(trained / "run", paths, tmp_path / "pred", progress=False, log=lambda *_: None)
    # predict scores float32 tokens, the evaluation the cache's float16 ones: about 1e-4 relative apart
    np.testing.assert_allclose([r.score for r in predicted], cached, rtol=5e-4)
    assert len(list((tmp_path / "pred" / "overlays").glob("*.png"))) == len(paths)


def test_rlr_test_skips_a_class_without_test_images(trained, tmp_path, capsys):
    import shutil

    from rlr.cli import main

    data = tmp_path / "data"
    shutil.copytree(trained / "data" / "fabric", data / "fabric")
    shutil.copytree(trained / "data" / "washer" / "train", data / "washer" / "train")   # train/good only
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    assert main(["test", "--run", str(run), "--data-root", str(data), "--cache-dir", str(trained / "cache"),
                 "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "washer" in table and "skipped: no test images" in table and "fabric" in table
    written = json.loads((run / "metrics.json").read_text())
    assert written["skipped"] == {"washer": "no test images"}
    assert set(written["classes"]) == {"fabric"} and written["mean"] == written["classes"]["fabric"]
    # No class with a test image: a named error.
    shutil.rmtree(data / "fabric" / "test")
    assert main(["test", "--run", str(run), "--data-root", str(data), "--cache-dir", str(trained / "cache"),
                 "--quiet"]) == 2
    assert "no test images in any class" in capsys.readouterr().err
