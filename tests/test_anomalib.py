"""rlr/integrations/anomalib: RLR trained, tested, predicted and exported by anomalib's Engine on a generated set.

The Engine tests need the `anomalib` extra (setup.py; `make test` and CI install it with the test extra); they
skip, saying so, where it is not installed. The optional-import tests run everywhere.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _pipeline import TINY_SETTINGS, make_dataset

pytestmark = pytest.mark.timm

HAVE_ANOMALIB = importlib.util.find_spec("anomalib") is not None
needs_anomalib = pytest.mark.skipif(not HAVE_ANOMALIB, reason="the anomalib extra is not installed "
                                    "(pip install -e '.[anomalib]')")
ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("fabric", "washer")
# The pipeline tests' tiny model; the number of epochs is the Engine's.
SETTINGS = {k: v for k, v in TINY_SETTINGS.items() if k not in ("backbone", "epochs")}


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_import_rlr_never_imports_anomalib():
    result = _python("import sys, rlr, rlr.inference, rlr.train, rlr.evaluate, rlr.cli, rlr.integrations\n"
                     "rlr.load, rlr.RLRModel\n"
                     "print(sorted(m for m in ('anomalib', 'lightning') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_anomalib_the_import_names_the_package_and_the_install_command():
    result = _python("import sys\nsys.modules['anomalib'] = None   # as if not installed\n"
                     "import rlr.integrations.anomalib")
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: rlr.integrations.anomalib needs the package 'anomalib'")
    assert 'pip install "rlr[anomalib]"' in message


# ------------------------------------------------------------------------------------------------ with anomalib

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "set", classes=CLASSES, n_train=6)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _unified(data, **kwargs):
    from anomalib.data import MVTecAD

    from rlr.integrations.anomalib import UnifiedDataModule

    return UnifiedDataModule([MVTecAD(root=data, category=c, num_workers=0, eval_batch_size=4) for c in CLASSES],
                             **kwargs)


def _engine(tmp_path, epochs):
    from anomalib.engine import Engine

    return Engine(max_epochs=epochs, default_root_dir=tmp_path / "results", logger=False, enable_progress_bar=False)


@pytest.fixture(scope="module")
def trained(data, cache, tmp_path_factory):
    """One unified model of the two classes, trained 2 epochs through the Engine, tested and predicted; scored as the
    wide recipe scores (log-standardized: statistics of held-out normals, which the saved run and its export carry)."""
    from rlr.integrations.anomalib import RLR

    folder = tmp_path_factory.mktemp("engine")
    model = RLR(backbone="tf_efficientnet_lite0", cache_dir=cache, holdout=0.2, scoring="log-standardized",
                **SETTINGS)
    datamodule = _unified(data)
    engine = _engine(folder, 2)
    engine.fit(model=model, datamodule=datamodule)
    results = engine.test(model=model, datamodule=datamodule, verbose=False)
    predictions = engine.predict(model=model, datamodule=datamodule)
    return model, datamodule, engine, results, predictions, folder


@needs_anomalib
def test_engine_tests_each_category_and_their_mean(trained):
    model, datamodule, _, results, _, _ = trained
    assert datamodule.test_categories == list(CLASSES)
    table = model.evaluator.results
    assert set(table["classes"]) == set(CLASSES)
    for name in ("image_AUROC", "pixel_AUROC", "image_F1Score", "pixel_F1Score"):
        per_class = [table["classes"][c][name] for c in CLASSES]
        assert all(0 <= v <= 1 for v in per_class)
        assert table["mean"][name] == pytest.approx(np.mean(per_class))
        assert results[0][name] == pytest.approx(table["mean"][name])
        assert results[0][f"{name}/fabric"] == pytest.approx(table["classes"]["fabric"][name])
    assert len(model.history) == 2 and model.history[-1]["epoch"] == 2


@needs_anomalib
def test_with_the_feature_cache_the_training_loader_reads_no_image(trained):
    from rlr.integrations.anomalib.data import ImagePaths, PathBatch

    model, datamodule, *_ = trained
    loader = datamodule.train_dataloader()
    assert all(isinstance(d, ImagePaths) for d in loader.dataset.datasets)
    batch = next(iter(loader))
    assert isinstance(batch, PathBatch) and batch.image is None and len(batch) == SETTINGS["batch_size"]
    assert model.cached_feature_paths([model.trainer.datamodule.datamodules[0].train_data])[0] is not None


@needs_anomalib
def test_threshold_is_rlrs_max_of_held_out_normals(trained, data):
    model, datamodule, *_ = trained
    threshold = model.threshold
    assert threshold.source == "holdout" and threshold.holdout == 0.2
    assert set(threshold.classes) == set(CLASSES)
    assert threshold.global_cut.images == sum(len(v) for v in datamodule.held_out.values()) == 2   # 1 of 6 per class
    assert threshold.global_cut.threshold == max(c.threshold for c in threshold.classes.values())
    post = model.post_processor   # anomalib's buffers hold it so that its normalisation is rlr's
    cut = threshold.global_cut
    assert float(post.image_threshold) == pytest.approx(cut.threshold)
    assert float(post.image_max - post.image_min) == pytest.approx(2 * cut.span, rel=1e-6)
    held = {p for paths in datamodule.held_out.values() for p in paths}
    trained_on = {str(p) for m in datamodule.datamodules for p in m.train_data.samples.image_path}
    assert held and not held & trained_on


@needs_anomalib
def test_predict_gives_scores_maps_labels_and_the_saved_run_agrees_in_rlr(trained, tmp_path):
    import rlr

    model, *_, predictions, _ = trained
    batch = predictions[1][0]   # washer's first test batch
    assert batch.pred_score.shape == (len(batch.image),) and batch.anomaly_map.shape[-2:] == (64, 64)
    assert batch.pred_label.dtype == torch.bool and batch.pred_mask.shape == batch.anomaly_map.shape
    assert ((batch.pred_score >= 0) & (batch.pred_score <= 1)).all()   # normalised, 0.5 = the threshold
    run = model.save_run(tmp_path / "run")
    assert (run / "threshold.json").is_file()
    detector = rlr.load(run, device="cpu", backend="reference")
    results = detector.predict([str(p) for p in batch.image_path])
    np.testing.assert_allclose([r.normalized_score for r in results], batch.pred_score.numpy(), atol=1e-5)
    assert [r.label for r in results] == [int(v) for v in batch.pred_label]
    with pytest.raises(rlr.run.RunError, match="already holds"):
        model.save_run(run)


@needs_anomalib
def test_predict_on_a_folder_of_images(trained, data, tmp_path):
    """engine.predict(data_path=...): anomalib's PredictDataset gives the images at their own size (here 72 x 80),
    resized as rlr resizes them."""
    from PIL import Image

    import rlr

    model, _, engine, *_ = trained
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((data / "washer" / "test").rglob("*.png"))[:3]:
        Image.open(path).resize((80, 72), Image.BICUBIC).save(folder / f"{path.parent.name}-{path.name}")
    batches = engine.predict(model=model, data_path=folder)
    scores = [float(b.pred_score[0]) for b in batches]
    assert len(scores) == len(list(folder.glob("*.png")))
    assert all(b.anomaly_map.shape[-2:] == (64, 64) for b in batches)
    run = model.save_run(tmp_path / "run")
    expected = rlr.load(run, device="cpu", backend="reference").predict([str(b.image_path[0]) for b in batches])
    np.testing.assert_allclose(scores, [r.normalized_score for r in expected], atol=1e-5)


@needs_anomalib
def test_rlr_test_of_the_saved_run_finds_its_data_and_agrees_on_image_auroc(trained, tmp_path, data):
    """MVTecAD members of one root: the run records that root, so `rlr test --run RUN` needs no --data-root. rlr
    test scores the cache's float16 tokens, anomalib the images (1e-4 apart): the image AUROCs agree."""
    from rlr.evaluate import evaluate

    model, *_ = trained
    run = model.save_run(tmp_path / "run")
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert checkpoint["data"]["root"] == str(data) and checkpoint["data"]["classes"] == list(CLASSES)
    metrics = evaluate(run, progress=False, log=lambda *_: None, backend="reference")
    for name in CLASSES:
        assert metrics["classes"][name]["image_auroc"] == pytest.approx(
            model.evaluator.results["classes"][name]["image_AUROC"], abs=1e-6)


@needs_anomalib
def test_unified_training_gives_rlr_trains_weights(data, cache, tmp_path):
    """The same images, recipe and seed through the Engine and UnifiedDataModule give `rlr train`'s weights bit for
    bit: the same holdout, class-balanced epochs, jitter noise, initialisation and learning rate per step."""
    from rlr.config import RLRConfig
    from rlr.integrations.anomalib import RLR
    from rlr.train import train

    recipe = dict(SETTINGS, holdout=0.2, class_balance=0.5, schedule="cosine", warmup_steps=2, seed=3)
    train(tmp_path / "rlr", data, RLRConfig(backbone="tf_efficientnet_lite0", epochs=3, **recipe), cache_dir=cache,
          progress=False, log=lambda *_: None)
    reference = torch.load(tmp_path / "rlr" / "checkpoint.pt", weights_only=True)
    model = RLR(backbone="tf_efficientnet_lite0", cache_dir=cache, **recipe)
    _engine(tmp_path, 3).fit(model=model, datamodule=_unified(data))
    for name, value in model.model.rlr.state_dict().items():
        assert torch.equal(value, reference["model"][name]), name
    assert [h["loss"] for h in model.history] == [h["loss"] for h in reference["history"]]
    stored = json.loads((tmp_path / "rlr" / "threshold.json").read_text())["global"]
    # rlr train scores the held-out images from the cache's float16 tokens, anomalib from the images.
    assert model.threshold.global_cut.threshold == pytest.approx(stored["threshold"], rel=1e-3)


@needs_anomalib
def test_a_plain_anomalib_datamodule_trains_with_the_recipes_batch(data, cache, tmp_path, caplog):
    from anomalib.data import MVTecAD

    from rlr.integrations.anomalib import RLR

    model = RLR(backbone="tf_efficientnet_lite0", cache_dir=cache, **dict(SETTINGS, batch_size=2))
    datamodule = MVTecAD(root=data, category="washer", num_workers=0, train_batch_size=32, eval_batch_size=4,
                         val_split_mode="from_train", val_split_ratio=0.34, seed=0)
    with caplog.at_level("WARNING"):
        _engine(tmp_path, 1).fit(model=model, datamodule=datamodule)
    assert datamodule.train_batch_size == 2 and "train_batch_size 32 is set to 2" in caplog.text
    assert model.history[0]["epoch"] == 1
    assert model.threshold.global_cut.images == 2 and set(model.threshold.classes) == {"washer"}


@needs_anomalib
def test_without_holdout_the_threshold_comes_from_the_training_images(data, cache, tmp_path):
    """The paper recipe keeps every training image (holdout 0): as `rlr train`, the threshold is then the max of the
    training images' own scores, and the "standardized" scoring's statistics come from them too."""
    from rlr.integrations.anomalib import RLR

    model = RLR(backbone="tf_efficientnet_lite0", cache_dir=cache, scoring="standardized", **SETTINGS)
    datamodule = _unified(data)
    _engine(tmp_path, 1).fit(model=model, datamodule=datamodule)
    assert datamodule.val_categories == [] and datamodule.held_out == {"fabric": [], "washer": []}
    assert model.threshold.source == "train" and model.threshold.global_cut.images == 12
    assert model.model.level_stats is not None and len(model.model.level_stats) == 2


@needs_anomalib
def test_rlr_resize_is_rlrs_lanczos_and_nearest_masks():
    from anomalib.data.utils import read_image
    from PIL import Image
    from torchvision import tv_tensors

    from rlr.backbone import resize_image
    from rlr.integrations.anomalib import RLRResize

    pixels = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    mask = tv_tensors.Mask(torch.from_numpy(np.random.default_rng(1).random((50, 70)) > 0.5).to(torch.uint8))
    resized, resized_mask = RLRResize(32)(image, mask)
    expected = resize_image(pixels, 32)
    assert torch.equal((resized * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(expected))
    assert resized_mask.shape == (32, 32) and set(resized_mask.unique().tolist()) <= {0, 1}
    batch = torch.stack([image, image])
    assert torch.equal(RLRResize(32)(batch)[1], resized)
    assert RLRResize(50)(torch.zeros(3, 50, 50)).shape == (3, 50, 50)


@needs_anomalib
def test_settings_errors_are_named():
    from rlr.config import ConfigError
    from rlr.integrations.anomalib import RLR

    with pytest.raises(ConfigError, match="Engine\\(max_epochs=N\\)"):
        RLR(backbone="tf_efficientnet_lite0", epochs=3, **SETTINGS)
    with pytest.raises(ConfigError, match="unknown RLR setting.*'widht'"):
        RLR(backbone="tf_efficientnet_lite0", widht=3, **SETTINGS)


def _export_matches_eager(model, engine, image, folder, size):
    import onnxruntime as ort

    path = engine.export(model=model, export_type="onnx", export_root=folder, input_size=size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = image if size is None else torch.nn.functional.interpolate(image, size=size, mode="bilinear")
    x = (x * 255).round() / 255   # an image file's values
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: x.numpy()})))
    assert set(outputs) == {"pred_score", "pred_label", "anomaly_map", "pred_mask"}
    model.eval()
    with torch.no_grad():
        eager = model(x)
    np.testing.assert_allclose(outputs["pred_score"], eager.pred_score.numpy(), atol=1e-5)
    np.testing.assert_allclose(outputs["anomaly_map"], eager.anomaly_map.numpy(), atol=1e-5)
    assert bool(outputs["pred_label"][0]) == bool(eager.pred_label[0])


@needs_anomalib
def test_onnx_export_equals_the_eager_module(trained, tmp_path):
    """engine.export(..., "onnx"): pre-processing, RLR and post-processing in standard operators."""
    from anomalib.data.utils import read_image

    model, _, engine, _, predictions, _ = trained
    image = read_image(str(predictions[0][0].image_path[0]), as_tensor=True)[None]
    _export_matches_eager(model, engine, image, tmp_path, None)


@needs_anomalib
@pytest.mark.slow
def test_onnx_export_of_another_input_size_resizes_as_rlr(trained, tmp_path):
    from anomalib.data.utils import read_image

    model, _, engine, _, predictions, _ = trained
    image = read_image(str(predictions[0][0].image_path[0]), as_tensor=True)[None]
    _export_matches_eager(model, engine, image, tmp_path, (80, 72))


@needs_anomalib
def test_the_lightning_checkpoint_brings_back_threshold_and_history(trained):
    from rlr.integrations.anomalib import RLR

    model, *_, folder = trained
    restored = RLR.load_from_checkpoint(next((folder / "results").rglob("*.ckpt")))
    assert restored.threshold == model.threshold and restored.history == model.history
    assert restored.model.scoring == "log-standardized" and restored.model.level_stats == model.model.level_stats
    assert restored.post_processor.threshold == model.threshold
