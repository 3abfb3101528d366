"""rlr.report: the HTML page is produced, self-contained, and every image in it decodes."""
import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from rlr.data import Sample
from rlr.metrics import METRIC_NAMES, ClassMetrics, mean_metrics
from rlr.report import ClassOutcome, write_report

S = 32


def _class(root, name, n_good, n_bad, with_masks, seed):
    rng = np.random.default_rng(seed)
    samples, maps, masks = [], [], []
    for i in range(n_good + n_bad):
        label = int(i >= n_good)
        path = root / name / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
        mask = np.zeros((S, S), bool)
        mask_path = None
        if label:
            mask[5:12, 8:20] = True
            if with_masks:
                mask_path = root / name / f"{i:03d}_mask.png"
                Image.fromarray(np.kron(mask, np.ones((3, 3), bool)).astype(np.uint8)[:48, :48] * 255).save(mask_path)
                mask_path = str(mask_path)
        samples.append(Sample(str(path), name, label, "crack" if label else "good", mask_path))
        maps.append((rng.random((S, S)) + 0.8 * mask * rng.random()).astype(np.float32))
        masks.append(mask)
    maps, masks = np.stack(maps), np.stack(masks)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    labels = np.array([s.label for s in samples])
    metrics = ClassMetrics(with_masks)
    metrics.update(labels, scores, maps, masks) if with_masks else metrics.update(labels, scores)
    calls = []

    def anomaly_maps(indices):
        calls.append(list(indices))
        return maps[list(indices)]

    return ClassOutcome(name, samples, scores, anomaly_maps), metrics.compute(), calls


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    outcomes, per_class, calls = [], {}, {}
    for name, n_good, n_bad, with_masks, seed in (("bottle", 6, 8, True, 0), ("solar<cell>", 5, 5, False, 1),
                                                  ("only_good", 4, 0, True, 2)):
        outcome, metrics, call_log = _class(tmp_path / "data", name, n_good, n_bad, with_masks, seed)
        outcomes.append(outcome)
        per_class[name] = metrics
        calls[name] = call_log
    metrics = {"classes": per_class, "mean": mean_metrics(per_class)}
    path = write_report(tmp_path / "out" / "report.html", metrics, outcomes, title="Test run")
    return path, metrics, calls


def test_report_is_written_and_self_contained(report):
    path, metrics, calls = report
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["report.html"]
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<title>Test run</title>" in text
    sources = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]+)['"]""", text)
    images = [s for s in sources if s.startswith("data:")]
    assert len(images) >= 10
    for uri in images:
        assert uri.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).verify()
    for ref in (s for s in sources if not s.startswith("data:")):
        assert ref.startswith("#") or (path.parent / ref).exists(), ref  # anchors, or files next to the page
    anchors = {a for a in re.findall(r"id='([^']+)'", text)}
    assert all(ref[1:] in anchors for ref in sources if ref.startswith("#"))


def test_report_content(report):
    path, metrics, calls = report
    text = path.read_text(encoding="utf-8")
    bottle = metrics["classes"]["bottle"]
    for name in METRIC_NAMES:
        assert f"{100 * bottle[name]:.1f}" in text
    assert "solar&lt;cell&gt;" in text and "solar<cell>" not in text  # names are escaped
    assert "No ground-truth masks" in text
    assert "Most anomalous" in text and "Least anomalous" in text and "False alarms" in text
    # Maps are asked for once per class, for distinct test indices only.
    for name, log in calls.items():
        assert len(log) == 1 and len(set(log[0])) == len(log[0])
    assert "both good and anomalous images are needed" in text  # the class without defects


def test_flat_metrics_and_bad_maps(tmp_path):
    outcome, metrics, _ = _class(tmp_path / "data", "bottle", 3, 3, True, 4)
    path = write_report(tmp_path / "flat.html", {"bottle": metrics}, [outcome])
    assert "mean" in path.read_text(encoding="utf-8")
    broken = ClassOutcome("bottle", outcome.samples, outcome.scores, lambda idx: np.zeros((len(idx), 4, 5)))
    with pytest.raises(ValueError, match=r"\(n, S, S\)"):
        write_report(tmp_path / "bad.html", {"bottle": metrics}, [broken])
    short = ClassOutcome("bottle", outcome.samples, outcome.scores[:2], outcome.anomaly_maps)
    with pytest.raises(ValueError, match="scores"):
        write_report(tmp_path / "bad.html", {"bottle": metrics}, [short])
