"""rlr/features.py: the feature cache hits, and misses after any change of image or setting."""
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from rlr.backbone import RANDOM_WEIGHTS, create_backbone
from rlr.data import DatasetError
from rlr.features import MAX_SHARDS, CacheWarning, FeatureCache, cache_entries, default_cache_dir, file_digest

pytestmark = pytest.mark.timm   # the lite0 backbone: timm, which imports torchvision


@pytest.fixture(scope="module")
def extractor():
    return create_backbone("tf_efficientnet_lite0", RANDOM_WEIGHTS, input_size=64)


def write_images(folder, count, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


class CountingExtractor(torch.nn.Module):
    """Wraps an extractor and counts the images it sees."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.images = inner, 0
        for name in ("name", "weights_id", "input_size", "avg_pool", "channels", "grids"):
            setattr(self, name, getattr(inner, name))
        self.model = inner.model

    def forward(self, x):
        self.images += x.shape[0]
        return self.inner(x)


def test_cache_hit_and_values(tmp_path, extractor):
    paths = write_images(tmp_path / "img", 5)
    counting = CountingExtractor(extractor)
    cache = FeatureCache(counting, tmp_path / "cache", batch_size=2, progress=False)
    table = cache.features(paths)
    assert counting.images == 5 and len(table) == 5
    assert table.image_shape(0) == (48, 40)
    batch = table.batch([4, 0])
    assert [b.shape for b in batch] == [(2, 64, 40), (2, 16, 112)] and batch[0].dtype == np.float16
    direct = extractor(extractor.preprocess([np.asarray(Image.open(paths[4]))]))
    np.testing.assert_array_equal(batch[0][0], direct[0][0].half().numpy())
    # Same images again, in another order and through a new cache object: nothing recomputed.
    again = FeatureCache(counting, tmp_path / "cache", progress=False).features(paths[::-1])
    assert counting.images == 5
    np.testing.assert_array_equal(again.batch([0])[1], table.batch([4])[1])
    # One new image: only it is computed.
    more = write_images(tmp_path / "more", 1, seed=9)
    FeatureCache(counting, tmp_path / "cache", progress=False).features(paths + more)
    assert counting.images == 6


def test_changed_image_is_recomputed(tmp_path, extractor):
    paths = write_images(tmp_path / "img", 3)
    counting = CountingExtractor(extractor)
    cache = FeatureCache(counting, tmp_path / "cache", progress=False)
    before = cache.features(paths).batch([1])[0].copy()
    Image.fromarray(np.zeros((48, 40, 3), np.uint8)).save(paths[1])   # same name, new content
    after = cache.features(paths)
    assert counting.images == 4
    assert not np.array_equal(before, after.batch([1])[0])


def test_changed_setting_uses_another_entry(tmp_path, extractor):
    paths = write_images(tmp_path / "img", 2)
    root = tmp_path / "cache"
    folders = {
        FeatureCache(extractor, root, progress=False).folder,
        FeatureCache(create_backbone("tf_efficientnet_lite0", RANDOM_WEIGHTS, input_size=64, avg_pool=False),
                     root, progress=False).folder,
        FeatureCache(create_backbone("tf_efficientnet_lite0", RANDOM_WEIGHTS, input_size=96), root,
                     progress=False).folder,
        FeatureCache(create_backbone("tf_efficientnet_lite0", input_size=64), root, progress=False).folder,  # weights
    }
    assert len(folders) == 4
    for folder in folders:
        assert json.loads((folder / "settings.json").read_text())["backbone"] == "tf_efficientnet_lite0"


def test_damaged_shard_is_ignored_and_corrupt_image_named(tmp_path, extractor):
    paths = write_images(tmp_path / "img", 2)
    counting = CountingExtractor(extractor)
    cache = FeatureCache(counting, tmp_path / "cache", progress=False)
    cache.features(paths)
    for npy in cache.folder.glob("*.l1.npy"):
        npy.write_bytes(b"garbage")
    with pytest.warns(CacheWarning, match="damaged"):
        FeatureCache(counting, tmp_path / "cache", progress=False).features(paths)
    assert counting.images == 4                      # recomputed, the damaged shard never read
    bad = tmp_path / "img" / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="bad.png"):
        cache.features(paths + [str(bad)])
    assert not list(cache.folder.glob(".*.tmp"))     # no half-written shard left behind


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RLR_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("RLR_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "rlr"


def test_truncated_shard_is_rebuilt_with_a_warning(tmp_path, extractor):
    paths = write_images(tmp_path / "img", 3)
    counting = CountingExtractor(extractor)
    expected = FeatureCache(counting, tmp_path / "cache", progress=False).features(paths).batch([0, 1, 2])
    (npy,) = FeatureCache(counting, tmp_path / "cache", progress=False).folder.glob("*.l0.npy")
    with open(npy, "r+b") as handle:    # a shard cut short, as by a full disk
        handle.truncate(npy.stat().st_size // 2)
    with pytest.warns(CacheWarning, match="damaged.*3 images are recomputed"):
        table = FeatureCache(counting, tmp_path / "cache", progress=False).features(paths)
    assert counting.images == 6
    for got, want in zip(table.batch([0, 1, 2]), expected):
        np.testing.assert_array_equal(got, want)
    assert not npy.exists()             # the damaged files are gone, the index lists the rebuilt shard only
    FeatureCache(counting, tmp_path / "cache", progress=False).features(paths)
    assert counting.images == 6


def test_many_calls_are_merged_into_few_shards_behind_one_index(tmp_path, extractor):
    paths = write_images(tmp_path / "img", MAX_SHARDS + 3)
    cache = FeatureCache(extractor, tmp_path / "cache", progress=False)
    for path in paths:                  # one call per image: one new shard each
        cache.features([path])
    index = json.loads((cache.folder / "index.json").read_text())
    assert len(index["shards"]) <= MAX_SHARDS
    assert len(list(cache.folder.glob("*.l0.npy"))) == len(index["shards"])   # merged shards deleted
    assert sorted(h for s in index["shards"].values() for h in s["hashes"]) == sorted(file_digest(p) for p in paths)
    fresh = FeatureCache(extractor, tmp_path / "cache", progress=False).features(paths)
    for i, path in enumerate(paths):
        direct = extractor(extractor.preprocess([np.asarray(Image.open(path))]))
        np.testing.assert_array_equal(fresh.batch([i])[0][0], direct[0][0].half().numpy())


def test_cache_folder_of_an_older_rlr_is_read_and_indexed(tmp_path, extractor):
    paths = write_images(tmp_path / "img", 2)
    counting = CountingExtractor(extractor)
    cache = FeatureCache(counting, tmp_path / "cache", progress=False)
    cache.features(paths)
    index_file = cache.folder / "index.json"
    ((name, meta),) = json.loads(index_file.read_text())["shards"].items()
    (cache.folder / f"{name}.json").write_text(json.dumps(meta))   # per-shard index files, no index.json
    index_file.unlink()
    FeatureCache(counting, tmp_path / "cache", progress=False).features(paths + write_images(tmp_path / "new", 1, 5))
    assert counting.images == 3                                      # the old shard was found
    assert not (cache.folder / f"{name}.json").exists() and index_file.exists()


def test_cache_command_lists_sizes_and_clears_by_age(tmp_path, extractor, capsys):
    from rlr.cli import main

    root = tmp_path / "cache"
    FeatureCache(extractor, root, progress=False).features(write_images(tmp_path / "img", 2))
    other = FeatureCache(create_backbone("tf_efficientnet_lite0", RANDOM_WEIGHTS, input_size=96), root,
                         progress=False)
    other.features(write_images(tmp_path / "img", 2))
    old = time.time() - 10 * 86400
    os.utime(other.folder / "index.json", (old, old))
    assert main(["cache", "list", "--cache-dir", str(root)]) == 0
    listing = capsys.readouterr().out
    assert other.folder.name in listing and "KiB" in listing and "10.0" in listing
    assert [e.images for e in cache_entries(root)] == [2, 2]
    assert main(["cache", "clear", "--older-than", "5", "--cache-dir", str(root)]) == 0
    assert "removed 1 cache folder" in capsys.readouterr().out
    assert [e.folder for e in cache_entries(root)] == [FeatureCache(extractor, root, progress=False).folder]
    assert main(["cache", "clear", "--cache-dir", str(root)]) == 0
    assert cache_entries(root) == []
    assert main(["cache", "list", "--cache-dir", str(root)]) == 0 and "empty" in capsys.readouterr().out


def test_index_is_read_under_the_lock_while_another_rank_merges(tmp_path, extractor, monkeypatch):
    """A reader between reading index.json and opening the shards it lists, while another process (a thread with
    its own lock file handle here) adds a shard and merges them all, deleting the listed files: the merge waits for
    the reader's lock, and the reader finds every image (it raised KeyError when it read the index unlocked)."""
    import threading

    import rlr.features as features

    paths = []
    for i in range(MAX_SHARDS - 1):   # one shard per call; the reader's new image makes the last one before a merge
        paths += write_images(tmp_path / f"img{i}", 1, seed=i)
        FeatureCache(extractor, tmp_path / "cache", progress=False).features(paths[-1:])
    paths += write_images(tmp_path / "uncached", 1, seed=50)
    merging = threading.Thread(target=lambda: FeatureCache(extractor, tmp_path / "cache", progress=False).features(
        write_images(tmp_path / "other", 1, seed=99)))
    real_read, reads = features._read_index, []

    def read_then_let_the_merge_run(folder):
        shards = real_read(folder)
        if threading.current_thread() is threading.main_thread():
            reads.append(1)
            if len(reads) == 3:        # the reader's second look-up, after computing its uncached image
                merging.start()
                merging.join(timeout=3)   # without the reader's lock the merge completes here
        return shards

    monkeypatch.setattr(features, "_read_index", read_then_let_the_merge_run)
    counting = CountingExtractor(extractor)
    reader = FeatureCache(counting, tmp_path / "cache", progress=False)
    table = reader.features(paths)
    merging.join(timeout=60)
    assert counting.images == 1 and not merging.is_alive()
    assert len(json.loads((reader.folder / "index.json").read_text())["shards"]) == 1   # the merge did happen
    for i, path in enumerate(paths):   # read from the maps of the shards the merge deleted
        direct = extractor(extractor.preprocess([np.asarray(Image.open(path))]))
        np.testing.assert_array_equal(table.batch([i])[0][0], direct[0][0].half().numpy())
