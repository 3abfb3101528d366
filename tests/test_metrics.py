"""rlr.metrics: exactness vs scikit-learn, AUPRO vs a plain per-threshold loop, None handling, mean."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from rlr.metrics import (
    METRIC_NAMES, ClassMetrics, binary_curves, f1max_threshold, mean_metrics, partial_trapezoid, score_keys,
)


def _f1max_sklearn(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0)
    return f1.max()


def _aupro_loop(maps, masks, limit=0.3):
    """The definition, one threshold at a time (slow; for small cases)."""
    regions = []
    for score_map, mask in zip(maps, masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [score_map[labelled == r] for r in range(1, count + 1)]
    normal = maps[~masks]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fpr.append(np.mean(normal >= t))
        pro.append(np.mean([np.mean(region >= t) for region in regions]))
    fpr, pro = np.array(fpr), np.array(pro)
    first_beyond = np.argmax(fpr > limit)
    pro_at_limit = np.interp(limit, fpr[first_beyond - 1:first_beyond + 1], pro[first_beyond - 1:first_beyond + 1])
    inside = fpr <= limit
    return np.trapezoid(np.r_[pro[inside], pro_at_limit], np.r_[fpr[inside], limit]) / limit


def _case(seed, n=12, size=24, levels=None):
    """Random maps with blob-shaped defects on every third image; ``levels``: quantise scores (ties)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3 == 1).astype(np.int64)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 6, 2)
            masks[i, r:r + rng.integers(1, 7), c:c + rng.integers(1, 7)] = True
    maps = rng.random((n, size, size)) + masks * rng.uniform(0.1, 0.8)
    maps = ndimage.gaussian_filter(maps, (0, 1, 1)).astype(np.float32)
    if levels:
        maps = (np.floor(maps * levels) / levels).astype(np.float32)
    scores = maps.reshape(n, -1).max(axis=1) + rng.normal(0, 0.05, n)
    return labels, scores, maps, masks


def _accumulate(labels, scores, maps, masks, batch=5):
    metrics = ClassMetrics(has_masks=True)
    for start in range(0, len(labels), batch):
        s = slice(start, start + batch)
        metrics.update(labels[s], scores[s], maps[s], masks[s])
    return metrics.compute()


@pytest.mark.parametrize("seed", range(4))
def test_image_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60) + 0.3 * labels, 1 if seed % 2 else 6)  # odd seeds: many ties
    metrics = ClassMetrics(has_masks=False)
    metrics.update(labels[:25], scores[:25])
    metrics.update(labels[25:], scores[25:])
    result = metrics.compute()
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["image_f1max"] == pytest.approx(_f1max_sklearn(labels, scores), abs=1e-12)
    assert all(result[m] is None for m in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"))


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_exact_on_representable_scores(seed):
    # Multiples of 1/64 keep distinct bins, so binning changes nothing: results equal sklearn's.
    labels, scores, maps, masks = _case(seed, levels=64)
    result = _accumulate(labels, scores, maps, masks)
    y, x = masks.ravel(), maps.ravel()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(y, x), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(y, x), abs=1e-12)
    assert result["pixel_f1max"] == pytest.approx(_f1max_sklearn(y, x), abs=1e-12)


def test_pixel_metrics_on_continuous_scores():
    labels, scores, maps, masks = _case(7)
    result = _accumulate(labels, scores, maps, masks)
    y, x = masks.ravel(), maps.ravel()
    keys = score_keys(x).astype(np.float64)
    # Exactly the metrics of the binned scores...
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(y, keys), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(y, keys), abs=1e-12)
    assert result["pixel_f1max"] == pytest.approx(_f1max_sklearn(y, keys), abs=1e-12)
    # ...and within the binning effect of the raw float32 scores.
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(y, x), abs=2e-4)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(y, x), abs=2e-4)


def test_score_keys_preserve_order():
    values = np.array([-np.inf, -3e8, -1.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 0.5003, 1.0, 7.0, 3e38, np.inf], np.float32)
    keys = score_keys(values)
    assert np.all(np.diff(keys.astype(np.int64)) >= 0)
    assert keys[4] == keys[5]  # -0.0 and +0.0 are one score
    assert keys[7] != keys[8]  # 0.06 % apart: distinct bins (bin width 2**-12 here)
    assert keys.max() < 2 ** 20


@pytest.mark.parametrize("seed, levels", [(0, None), (1, 16), (2, None), (3, 8), (4, 64)])
def test_aupro_matches_plain_loop(seed, levels):
    labels, scores, maps, masks = _case(seed, levels=levels)
    result = _accumulate(labels, scores, maps, masks, batch=4)
    # Continuous scores: the loop sees the binned scores the accumulator works on.
    looped = maps if levels else score_keys(maps).astype(np.float64)
    assert result["aupro"] == pytest.approx(_aupro_loop(looped, masks), abs=1e-9)


def test_aupro_regions_are_8_connected_and_per_image():
    maps = np.zeros((2, 6, 6), np.float32)
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal neighbours: one region
    masks[1, 4, 4] = True
    maps[0, 1, 1] = maps[1, 4, 4] = 1.0     # half of region 1 and all of region 2 found first
    metrics = ClassMetrics(has_masks=True)
    metrics.update([1, 1], [1.0, 1.0], maps, masks)
    assert metrics.compute()["aupro"] == pytest.approx(_aupro_loop(maps, masks), abs=1e-12)
    assert metrics._regions == 2


def test_perfect_and_inverted_maps():
    labels, scores, maps, masks = _case(3)
    perfect = _accumulate(labels, labels.astype(float), masks.astype(np.float32), masks)
    assert all(perfect[m] == pytest.approx(1.0) for m in METRIC_NAMES)
    inverted = _accumulate(labels, -labels.astype(float), (~masks).astype(np.float32), masks)
    assert inverted["pixel_auroc"] == pytest.approx(0.0) and inverted["aupro"] == pytest.approx(0.0)


def test_none_when_undefined():
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    no_defect = ClassMetrics(has_masks=True)
    no_defect.update([0, 0, 0], [0.1, 0.2, 0.3], maps, np.zeros((3, 8, 8), bool))
    assert all(v is None for v in no_defect.compute().values())
    empty_masks = ClassMetrics(has_masks=True)  # anomalous images whose masks are empty
    empty_masks.update([0, 1, 1], [0.1, 0.2, 0.3], maps, np.zeros((3, 8, 8), bool))
    result = empty_masks.compute()
    assert result["image_auroc"] == 1.0 and result["pixel_auroc"] is None and result["aupro"] is None


def test_accepts_torch_tensors_and_float16():
    import torch

    labels, scores, maps, masks = _case(5, levels=32)
    reference = _accumulate(labels, scores, maps, masks)
    metrics = ClassMetrics(has_masks=True)
    metrics.update(torch.from_numpy(labels), torch.from_numpy(scores), torch.from_numpy(maps).half(),
                   torch.from_numpy(masks))
    assert metrics.compute() == pytest.approx(reference)


def test_memory_does_not_grow_with_pixels():
    labels, scores, maps, masks = _case(6)
    metrics = ClassMetrics(has_masks=True)
    metrics.update(labels, scores, maps, masks)
    sizes = [a.nbytes for a in vars(metrics).values() if isinstance(a, np.ndarray)]
    for _ in range(5):
        metrics.update(labels, scores, maps, masks)
    assert [a.nbytes for a in vars(metrics).values() if isinstance(a, np.ndarray)] == sizes
    assert sum(sizes) == 24 * 2 ** 20


def _exact_aupro(maps, masks):
    """AUPRO of the raw float scores (sort-based, memory O(pixels)): the reference for the binning."""
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    regions, count = ndimage.label(masks, structure=structure)
    size = np.bincount(regions.ravel())
    x, y = maps.ravel().astype(np.float64), masks.ravel()
    weight = np.where(y, 1.0 / size[regions.ravel()], 0.0)
    order = np.argsort(-x, kind="stable")
    last = np.r_[np.flatnonzero(np.diff(x[order])), len(x) - 1]
    fpr = np.r_[0.0, np.cumsum(~y[order])[last] / (~y).sum()]
    pro = np.r_[0.0, np.cumsum(weight[order])[last] / count]
    return partial_trapezoid(fpr, pro, 0.3) / 0.3


@pytest.mark.slow
@pytest.mark.parametrize("name", ["brick", "washer"])
def test_binning_effect_on_synthetic_maps(tmp_path, name):
    """Binned vs exact float32 pixel metrics on 256 px maps of the synthetic set (a simple
    distance-to-mean-image detector). Run with: pytest -m slow tests/test_metrics.py -k binning -s"""
    from rlr.data import load_dataset, load_image, load_mask
    from rlr.data.synthetic import generate_dataset

    split = load_dataset(generate_dataset(tmp_path / "set", classes=[name], n_train=20), layout="mvtec")[name]
    train = np.stack([load_image(s.path) for s in split.train]).astype(np.float32) / 255
    mean, std = train.mean(0), train.std(0) + 0.05
    maps = np.stack([ndimage.gaussian_filter((np.abs(load_image(s.path) / 255 - mean) / std).mean(-1), 2)
                     for s in split.test]).astype(np.float32)
    masks = np.stack([load_mask(s.mask_path, 256) if s.mask_path else np.zeros((256, 256), bool) for s in split.test])
    labels = np.array([s.label for s in split.test])
    result = _accumulate(labels, maps.reshape(len(maps), -1).max(1), maps, masks, batch=8)
    y, x = masks.ravel(), maps.ravel()
    exact = {"pixel_auroc": roc_auc_score(y, x), "pixel_ap": average_precision_score(y, x),
             "pixel_f1max": _f1max_sklearn(y, x), "aupro": _exact_aupro(maps, masks)}
    differences = {k: abs(result[k] - v) for k, v in exact.items()}
    print(name, {k: f"{v:.1e}" for k, v in differences.items()})
    assert max(differences.values()) < 5e-4


def test_bad_inputs():
    maps = np.zeros((2, 4, 4), np.float32)
    masks = np.zeros((2, 4, 4), bool)
    with pytest.raises(ValueError, match="needs anomaly_maps"):
        ClassMetrics(True).update([0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="has_masks=False"):
        ClassMetrics(False).update([0, 1], [0.1, 0.2], maps, masks)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        ClassMetrics(False).update([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 \\(good\\) or 1"):
        ClassMetrics(False).update([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        ClassMetrics(False).update([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        ClassMetrics(True).update([0, 1], [0.1, 0.2], maps, masks[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        ClassMetrics(True).update([0, 1], [0.1, 0.2], maps + np.nan, masks)
    bad = masks.copy()
    bad[0, 0, 0] = True
    with pytest.raises(ValueError, match="good image"):
        ClassMetrics(True).update([0, 1], [0.1, 0.2], maps, bad)
    with pytest.raises(ValueError, match="no test samples"):
        ClassMetrics(True).compute()


def test_binary_curves_and_threshold():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    curves = binary_curves(labels, scores)
    assert np.trapezoid(curves["tpr"], curves["fpr"]) == pytest.approx(roc_auc_score(labels, scores))
    threshold = f1max_threshold(labels, scores)
    predicted = scores >= threshold
    tp = (predicted & (labels == 1)).sum()
    f1 = 2 * tp / (predicted.sum() + labels.sum())
    assert f1 == pytest.approx(_f1max_sklearn(labels, scores)) and threshold == 0.35
    with pytest.raises(ValueError, match="both"):
        binary_curves([1, 1], [0.1, 0.2])


def test_mean_metrics():
    per_class = {
        "a": dict.fromkeys(METRIC_NAMES, 0.5),
        "b": {**dict.fromkeys(METRIC_NAMES, 1.0), "pixel_auroc": None, "aupro": None},
        "c": {**dict.fromkeys(METRIC_NAMES, 0.0), "aupro": None, "extra": 3},
    }
    mean = mean_metrics(per_class)
    assert list(mean) == list(METRIC_NAMES)
    assert mean["image_auroc"] == pytest.approx(0.5)
    assert mean["pixel_auroc"] == pytest.approx(0.25)  # (0.5 + 0.0) / 2: None is skipped
    assert mean["aupro"] == pytest.approx(0.5)
    assert mean_metrics({"x": dict.fromkeys(METRIC_NAMES)}) == dict.fromkeys(METRIC_NAMES)
    with pytest.raises(ValueError, match="no classes"):
        mean_metrics({})
