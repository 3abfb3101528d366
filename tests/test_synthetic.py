"""rlr.data.synthetic: determinism, exact masks, MVTec layout readable by load_dataset."""
import json

import numpy as np
import pytest

from rlr.data import DatasetError, load_dataset, load_image, load_mask
from rlr.data.synthetic import DEFECT_KINDS, MARKER_FILE, SYNTHETIC_CLASSES, generate_dataset, render_sample

SMALL = dict(size=64, n_train=3, n_test_good=2, n_test_defect=4)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("synthetic") / "set", seed=3, **SMALL)


def _pngs(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.png"))


def test_layout_loads(small_set):
    data = load_dataset(small_set)
    assert list(data) == sorted(SYNTHETIC_CLASSES) and len(SYNTHETIC_CLASSES) >= 3
    for name, split in data.items():
        assert split.has_masks and len(split.train) == 3 and len(split.test) == 6
        defects = {s.defect for s in split.test if s.label == 1}
        assert defects == set(DEFECT_KINDS[name][:4])
        for sample in split.test:
            image = load_image(sample.path)
            assert image.shape == (64, 64, 3)
            if sample.label:
                assert load_mask(sample.mask_path, 64, image_shape=image.shape[:2]).any()
    marker = json.loads((small_set / MARKER_FILE).read_text())
    assert marker["seed"] == 3 and marker["size"] == 64


def test_deterministic_for_a_seed(small_set, tmp_path):
    again = generate_dataset(tmp_path / "again", seed=3, **SMALL)
    files = _pngs(small_set)
    assert files == _pngs(again) and len(files) == 4 * (3 + 2 + 4 + 4)
    for rel in files:
        assert np.array_equal(np.asarray(load_image(small_set / rel)), np.asarray(load_image(again / rel))), rel
    other = generate_dataset(tmp_path / "other", seed=4, **SMALL)
    differs = [not np.array_equal(load_image(small_set / r), load_image(other / r)) for r in files]
    assert all(differs)


def test_masks_cover_exactly_the_altered_pixels(small_set):
    """Each defective image differs from its normal counterpart (same seed, no defect) exactly on its mask."""
    for name in SYNTHETIC_CLASSES:
        kinds = DEFECT_KINDS[name]
        for i in range(SMALL["n_test_defect"]):
            kind, number = kinds[i % len(kinds)], i // len(kinds)
            saved = load_image(small_set / name / "test" / kind / f"{number:03d}.png")
            mask = load_mask(small_set / name / "ground_truth" / kind / f"{number:03d}_mask.png", 64)
            normal, empty = render_sample(name, "test_defect", i, seed=3, size=64)
            assert not empty.any()
            altered = (saved != normal).any(axis=-1)
            assert np.array_equal(altered, mask), (name, kind, i)
            assert mask.sum() >= 6


@pytest.mark.parametrize("name", SYNTHETIC_CLASSES)
def test_every_defect_kind_at_full_size(name):
    for i, kind in enumerate(DEFECT_KINDS[name]):
        image, mask = render_sample(name, "test_defect", i, seed=0, size=256, defect=kind)
        normal, _ = render_sample(name, "test_defect", i, seed=0, size=256)
        assert image.dtype == np.uint8 and image.shape == (256, 256, 3)
        assert np.array_equal((image != normal).any(axis=-1), mask)
        assert 20 <= mask.sum() <= 0.1 * mask.size, (kind, int(mask.sum()))


def test_normal_images_vary(small_set):
    for name in SYNTHETIC_CLASSES:
        images = [load_image(small_set / name / "train" / "good" / f"{i:03d}.png").astype(np.float64) for i in range(3)]
        difference = np.abs(images[0] - images[1]).mean()
        assert difference > 2.0, (name, difference)  # not the same picture with noise


def test_reuse_and_refusal(small_set, tmp_path):
    assert generate_dataset(small_set, seed=3, **SMALL) == small_set  # same parameters: reused
    with pytest.raises(DatasetError, match="not empty"):
        generate_dataset(small_set, seed=5, **SMALL)
    with pytest.raises(DatasetError, match=r"unknown synthetic class.*'screw'"):
        generate_dataset(tmp_path / "x", classes=["screw"])
    with pytest.raises(ValueError, match="size"):
        generate_dataset(tmp_path / "y", size=16)
    with pytest.raises(ValueError, match="n_train"):
        generate_dataset(tmp_path / "z", n_train=0)


def test_class_subset(tmp_path):
    root = generate_dataset(tmp_path / "two", classes=["washer", "fabric"], size=64, n_train=1, n_test_good=1,
                            n_test_defect=1)
    assert sorted(load_dataset(root)) == ["fabric", "washer"]
