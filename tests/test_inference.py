"""rlr.inference (rlr.load, Detector.predict), rlr.threshold, and the robust `rlr predict`."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rlr
from rlr import threshold as thresholds
from rlr.data import load_dataset, load_image
from rlr.predict import predict
from rlr.train import train, training_samples

from _pipeline import make_dataset, tiny_config

pytestmark = pytest.mark.timm   # trains or loads the lite0 backbone: timm, which imports torchvision


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    make_dataset(root / "data")
    train(root / "run", root / "data", tiny_config(holdout=0.2), cache_dir=root / "cache", progress=False,
          log=lambda *_: None)
    return root


def test_inference_imports_neither_the_trainer_nor_distributed():
    code = "import sys, rlr.inference, rlr.predict; print(sorted(m for m in sys.modules if m in " \
           "('rlr.train', 'rlr.distributed')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_holdout_keeps_a_stable_share_of_each_class_out_of_training(tmp_path):
    make_dataset(tmp_path / "data", n_train=10)
    splits = load_dataset(tmp_path / "data")
    samples, held = training_samples(splits, 0.2, seed=0)
    assert {k: len(v) for k, v in held.items()} == {"fabric": 2, "washer": 2}
    assert len(samples) == 16 and not {s.path for s in samples} & {s.path for v in held.values() for s in v}
    assert training_samples(splits, 0.2, seed=0)[1] == held                 # the same images every time
    assert training_samples(splits, 0.0)[1] == {"fabric": [], "washer": []}
    small = load_dataset(make_dataset(tmp_path / "small", n_train=4))
    assert training_samples(small, 0.2)[1] == {"fabric": [], "washer": []}  # too few images: all train


def test_training_stores_the_threshold_of_the_held_out_images(trained):
    stored = thresholds.load(trained / "run")
    assert stored.source == "holdout" and stored.holdout == 0.2
    assert set(stored.classes) == {"fabric", "washer"} and all(c.images == 1 for c in stored.classes.values())
    assert stored.global_cut.threshold == max(c.threshold for c in stored.classes.values())
    held = torch.load(trained / "run" / "checkpoint.pt", weights_only=True)["data"]["holdout"]
    assert held["share"] == 0.2 and all(len(v) == 1 for v in held["images"].values())
    # the held-out image scores the class threshold (the max of one score); training scored it from the
    # cache's float16 tokens, the detector from float32 tokens: about 1e-4 relative apart
    det = rlr.load(trained / "run")
    for name, paths in held["images"].items():
        assert det.predict(paths[0]).score == pytest.approx(stored.classes[name].threshold, rel=5e-4)


def test_normalized_score_is_one_half_at_the_threshold():
    cut = thresholds.Cut(threshold=2.0, low=1.0, images=5)
    assert cut.normalize(2.0) == 0.5 and cut.normalize(1.0) == 0.0 and cut.normalize(3.0) == 1.0
    assert cut.normalize(10.0) == 1.0 and cut.normalize(2.5) == 0.75
    assert thresholds.Threshold.fixed(4.0).cut().normalize(2.0) == 0.25
    assert thresholds.Threshold.fixed(4.0).cut("any class").threshold == 4.0
    with pytest.raises(thresholds.ThresholdError, match="no threshold for class 'cable'"):
        thresholds.choose({"a": np.array([1.0])}, "holdout", 0.1).cut("cable")


def test_detector_takes_every_input_kind_and_agrees_with_rlr_predict(trained, tmp_path):
    det = rlr.load(trained / "run")
    folder = trained / "data" / "washer" / "test" / "scratch"
    paths = sorted(str(p) for p in folder.iterdir())
    by_folder = det.predict(folder)
    rows = predict(trained / "run", [folder], tmp_path / "pred", overlays=False, progress=False, log=lambda *_: None)
    assert [r.path for r in by_folder] == paths
    assert [r.path for r in rows] == [Path(p).name for p in paths]   # scores.csv: relative to the folder given
    np.testing.assert_allclose([r.score for r in by_folder], [r.score for r in rows], rtol=1e-6)
    assert [r.label for r in by_folder] == [r.label for r in rows]
    image = load_image(paths[0])
    one = det.predict(paths[0])
    for x in (Image.open(paths[0]), image, torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255):
        other = det.predict(x)
        assert other.score == pytest.approx(one.score, rel=1e-6)
        assert other["label"] == one.label and other.anomaly_map.shape == image.shape[:2]
    batch = torch.from_numpy(np.stack([load_image(p) for p in paths])).permute(0, 3, 1, 2)
    np.testing.assert_allclose([r.score for r in det.predict(batch)], [r.score for r in rows], rtol=1e-6)
    cut = thresholds.load(trained / "run").global_cut
    assert one.label == int(one.score >= cut.threshold) and one.normalized_score == pytest.approx(cut.normalize(one.score))
    model_map = det.predict(paths[0], map_size="model").anomaly_map
    assert model_map.shape == (64, 64) and model_map.max() == pytest.approx(one.score, rel=1e-6)


def test_fast_and_eager_backbone_runtimes_score_alike_through_every_entry_point(trained, tmp_path):
    from rlr.cli import main

    paths = sorted(str(p) for p in (trained / "data" / "washer" / "test").rglob("*.png"))
    fast = rlr.load(trained / "run")
    eager = rlr.load(trained / "run", runtime="eager")
    assert fast.extractor.runtime == "fast" and eager.extractor.runtime == "eager"
    ours, theirs = [r.score for r in fast.predict(paths)], [r.score for r in eager.predict(paths)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    for runtime in ("fast", "eager"):
        assert main(["predict", "--run", str(trained / "run"), *paths, "--out", str(tmp_path / runtime),
                     "--no-overlays", "--quiet", "--backbone-runtime", runtime]) == 0
    with open(tmp_path / "fast" / "scores.csv") as a, open(tmp_path / "eager" / "scores.csv") as b:
        np.testing.assert_allclose([float(r["score"]) for r in csv.DictReader(a)],
                                   [float(r["score"]) for r in csv.DictReader(b)], rtol=1e-5)
    with pytest.raises(ValueError, match="backbone runtime must be one of"):
        rlr.load(trained / "run", runtime="jit")


def test_detector_names_bad_input(trained):
    det = rlr.load(trained / "run")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        det.predict(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        det.predict(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(TypeError, match="predict takes"):
        det.predict(3.5)
    with pytest.raises(ValueError, match="map_size"):
        det.predict(np.zeros((8, 8, 3), np.uint8), map_size="half")


def test_precision_that_the_hardware_lacks_is_an_error(trained, monkeypatch):
    monkeypatch.setattr(rlr.inference, "fp16_is_native", lambda device: False)
    with pytest.raises(ValueError, match="precision fp16 needs"):
        rlr.load(trained / "run", precision="fp16")


def test_bf16_inference_stays_close_to_fp32(trained):
    if not rlr.inference.bf16_is_native(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    path = next((trained / "data" / "washer" / "test" / "scratch").iterdir())
    fp32 = rlr.load(trained / "run").predict(path).score
    detector = rlr.load(trained / "run", precision="bf16")
    assert detector.predict(path).score == pytest.approx(fp32, rel=0.1)
    # the levels run as a bf16 copy of the model; the run's own model stays float32
    levels = detector.scorer._network()
    assert levels is not detector.run.model and {p.dtype for p in levels.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in detector.run.model.parameters()} == {torch.float32}


def test_predict_survives_a_bad_image_writes_as_it_goes_and_saves_maps(trained, tmp_path):
    good = sorted((trained / "data" / "fabric" / "test" / "good").iterdir())
    broken = tmp_path / "in" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    rows = predict(trained / "run", [str(good[0]), str(broken), str(good[1])], tmp_path / "pred", save_maps="npy",
                   batch_size=2, progress=False, log=lambda *_: None)
    assert [r.error is None for r in rows] == [True, False, True] and "broken.png" in rows[1].error
    with open(tmp_path / "pred" / "scores.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["path"] for row in table] == [str(good[0]), str(broken), str(good[1])]
    assert table[1]["score"] == "" and table[1]["error"] and table[0]["label"] in ("0", "1")
    heat = np.load(tmp_path / "pred" / "maps" / f"{good[0].stem}.npy")
    assert heat.shape == load_image(good[0]).shape[:2] and heat.dtype == np.float32
    mask = np.asarray(Image.open(tmp_path / "pred" / "masks" / f"{good[0].stem}.png"))
    cut = thresholds.load(trained / "run").global_cut
    assert set(np.unique(mask)) <= {0, 255} and (mask > 0).any() == bool(rows[0].label)
    assert (mask > 0).any() == (heat >= cut.threshold).any()
    png = predict(trained / "run", [str(good[0])], tmp_path / "png", save_maps="png", overlays=False, progress=False,
                  log=lambda *_: None)
    sixteen = np.asarray(Image.open(tmp_path / "png" / "maps" / f"{good[0].stem}.png"))
    assert sixteen.dtype == np.uint16 and sixteen.max() / 65535 == pytest.approx(png[0].normalized_score, abs=2e-3)
    assert sorted(p.name for p in (tmp_path / "pred" / "overlays").iterdir()) == [f"{good[0].stem}.png",
                                                                                 f"{good[1].stem}.png"]


def test_scores_csv_is_flushed_per_batch(trained, tmp_path, monkeypatch):
    import rlr.predict as module

    paths = sorted(str(p) for p in (trained / "data" / "washer" / "test").rglob("*.png"))
    real = module.Detector.score_images
    calls = []

    def stop_on_second_batch(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            lines = (tmp_path / "pred" / "scores.csv").read_text().splitlines()
            assert len(lines) == 1 + calls[0]   # header + the first batch, on disk before the job dies
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(module.Detector, "score_images", stop_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        predict(trained / "run", paths, tmp_path / "pred", batch_size=1, overlays=False, progress=False,
                log=lambda *_: None)


def test_a_run_without_threshold_still_loads_and_predict_says_so(trained, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained / "run", old)
    (old / thresholds.THRESHOLD_FILE).unlink()
    path = next((trained / "data" / "washer" / "test" / "scratch").iterdir())
    result = rlr.load(old).predict(path)
    assert result.label is None and result.normalized_score is None
    messages = []
    rows = predict(old, [path], tmp_path / "pred", overlays=False, progress=False, log=messages.append)
    assert rows[0].label is None and any("stores no threshold" in m for m in messages)
    given = rlr.load(old, threshold=result.score).predict(path)
    assert given.label == 1 and given.normalized_score == 0.5


def test_damaged_threshold_file_is_named(trained, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained / "run", bad)
    (bad / thresholds.THRESHOLD_FILE).write_text(json.dumps({"version": 1, "global": {}}))
    with pytest.raises(thresholds.ThresholdError, match="threshold.json is malformed"):
        rlr.load(bad)


def _tree(root: Path, trained: Path) -> Path:
    """A folder of subfolders, two images of the same file name in different ones, a hidden folder and a text file."""
    sources = sorted((trained / "data" / "fabric" / "test").rglob("*.png"))
    for relative, source in zip(("good/000.png", "crack/000.png", "crack/deep/001.png", ".thumbs/000.png"), sources):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(source.read_bytes())
    (root / "crack" / "notes.txt").write_text("not an image")
    return root


def test_predict_reads_a_folder_tree_and_mirrors_it(trained, tmp_path):
    tree = _tree(tmp_path / "test", trained)
    out = tree / "predictions"     # inside the input: a second call must not score the first call's outputs
    for _ in range(2):
        rows = predict(trained / "run", [tree], out, save_maps="npy", progress=False, log=lambda *_: None)
        assert [r.path for r in rows] == ["crack/000.png", "crack/deep/001.png", "good/000.png"]
        assert all(r.error is None for r in rows)
    with open(out / "scores.csv") as f:
        assert [row["path"] for row in csv.DictReader(f)] == ["crack/000.png", "crack/deep/001.png", "good/000.png"]
    for folder, suffix in (("overlays", ".png"), ("maps", ".npy"), ("masks", ".png")):
        written = sorted(str(p.relative_to(out / folder)) for p in (out / folder).rglob("*") if p.is_file())
        assert written == [f"crack/000{suffix}", f"crack/deep/001{suffix}", f"good/000{suffix}"]
    # the same relative path from two inputs: the later keeps its full path, its outputs a _2 suffix
    rows = predict(trained / "run", [tree / "good", tree / "crack", str(tree / "good" / "000.png")], tmp_path / "two",
                   progress=False, log=lambda *_: None)
    assert [r.path for r in rows] == ["000.png", "000.png".replace("000", str(tree / "crack" / "000")),
                                      "deep/001.png", str(tree / "good" / "000.png")]
    assert sorted(str(p.relative_to(tmp_path / "two" / "overlays")) for p in (tmp_path / "two" / "overlays").rglob(
        "*.png")) == ["000.png", "000_2.png", "000_3.png", "deep/001.png"]


def test_a_reused_output_folder_holds_only_the_new_call(trained, tmp_path):
    tree = _tree(tmp_path / "test", trained)
    out = tmp_path / "out"
    predict(trained / "run", [tree], out, save_maps="npy", progress=False, log=lambda *_: None)
    (out / "overlays" / "README.txt").write_text("the user's own file")
    one = tree / "good" / "000.png"
    predict(trained / "run", [str(one)], out, progress=False, log=lambda *_: None)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["overlays/000.png", "overlays/README.txt", "scores.csv"]


@pytest.mark.parametrize("batch_size", [0, -1])
def test_predict_refuses_a_batch_size_below_one_before_writing(trained, tmp_path, batch_size, capsys):
    from rlr.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.csv").write_text("path,score\nearlier.png,0.5\n")
    image = next((trained / "data" / "fabric" / "test" / "good").iterdir())
    with pytest.raises(ValueError, match="batch-size must be a positive"):
        predict(trained / "run", [image], out, batch_size=batch_size, progress=False, log=lambda *_: None)
    with pytest.raises(SystemExit) as stopped:
        main(["predict", "--run", str(trained / "run"), str(image), "--out", str(out), "--batch-size",
              str(batch_size)])
    assert stopped.value.code == 2 and "expected a positive whole number" in capsys.readouterr().err
    assert (out / "scores.csv").read_text() == "path,score\nearlier.png,0.5\n"
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        rlr.load(trained / "run", batch_size=batch_size)


def test_mask_and_map_agree_with_the_label_at_the_threshold(trained, tmp_path):
    """An image of another size than the model's: its map, resized, keeps the score as its max, so with the
    threshold exactly at the score the label is 1 and the mask is not empty."""
    source = load_image(next((trained / "data" / "washer" / "test" / "scratch").iterdir()))
    path = tmp_path / "odd.png"
    Image.fromarray(source).resize((131, 97), Image.BILINEAR).save(path)
    score = rlr.load(trained / "run").predict(path).score
    rows = predict(trained / "run", [str(path)], tmp_path / "pred", threshold=score, save_maps="npy", overlays=False,
                   progress=False, log=lambda *_: None)
    heat = np.load(tmp_path / "pred" / "maps" / "odd.npy")
    mask = np.asarray(Image.open(tmp_path / "pred" / "masks" / "odd.png"))
    assert rows[0].label == 1 and heat.shape == (97, 131) and float(heat.max()) == pytest.approx(score, rel=1e-7)
    assert (mask > 0).any() and (mask > 0).sum() == (heat.astype(np.float64) >= score).sum()
    above = predict(trained / "run", [str(path)], tmp_path / "above", threshold=float(np.nextafter(
        np.float32(score), np.float32(np.inf))), save_maps="npy", overlays=False, progress=False, log=lambda *_: None)
    assert above[0].label == 0 and not np.asarray(Image.open(tmp_path / "above" / "masks" / "odd.png")).any()


def test_resize_map_keeps_the_peak():
    from rlr.inference import resize_map

    heat = np.random.default_rng(3).random((64, 64)).astype(np.float32)
    for shape in ((97, 131), (40, 50), (64, 200), (1, 1)):
        resized = resize_map(heat, shape)
        assert resized.shape == shape and resized.max() == heat.max()
