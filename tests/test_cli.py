"""rlr/cli.py end to end on tiny generated images: train -> test -> predict (-> export errors), errors, demo."""
import csv
import json

import pytest

from _pipeline import make_dataset
from rlr.cli import main

pytestmark = pytest.mark.timm   # the lite0 backbone: timm, which imports torchvision

TINY_FLAGS = ["--backbone", "tf_efficientnet_lite0", "--backbone-weights", "random", "--input-size", "64",
              "--heads", "2", "--layers", "1", "--d-models", "16,32", "--window", "8=3", "--window", "4=3",
              "--batch-size", "4", "--backend", "reference", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("cli") / "data")


def test_train_test_predict(tmp_path, data, capsys):
    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(["train", "--data-root", str(data), "--out", str(run), "--epochs", "1", "--recipe", "fast",
                 "--cache-dir", str(cache)] + TINY_FLAGS) == 0
    assert "rlr test --run" in capsys.readouterr().out
    assert "--epochs may change" in error_of(["train", "--out", str(run), "--resume", "--lr", "1"], capsys)
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--cache-dir", str(cache), "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 2
    assert main(["test", "--run", str(run), "--cache-dir", str(cache), "--report", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "I-AUROC" in out and "mean" in out and "report.html" in out
    assert set(json.loads((run / "metrics.json").read_text())["classes"]) == {"fabric", "washer"}
    assert main(["predict", "--run", str(run), str(data / "fabric" / "test" / "good"), "--out", str(tmp_path / "pred"),
                 "--threshold", "0", "--quiet"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert len(rows) == 2 and all(row["label"] == "1" and row["normalized_score"] == "1" for row in rows)
    assert len(list((tmp_path / "pred" / "overlays").glob("*.png"))) == 2
    assert json.loads((run / "threshold.json").read_text())["source"] == "holdout"   # the fast recipe holds out 10 %
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    good = sorted((data / "fabric" / "test" / "good").iterdir())[0]
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(good), str(broken), "--out", str(tmp_path / "p2"), "--quiet",
                 "--no-overlays"]) == 1                        # some images failed: exit status 1, the others scored
    printed = capsys.readouterr().out
    assert f"{good}  score " in printed and f"{broken}  error: " in printed
    rows = list(csv.DictReader(open(tmp_path / "p2" / "scores.csv")))
    assert rows[0]["label"] in ("0", "1") and rows[1]["error"] and not rows[1]["score"]
    assert "opset 11 is too old" in error_of(["export", "--run", str(run), "--out", str(tmp_path / "m.onnx"),
                                              "--opset", "11"], capsys)


def test_train_input_size_auto_is_resolved_and_recorded(tmp_path, data, capsys):
    flags = [f for f in TINY_FLAGS]
    flags[flags.index("--input-size") + 1] = "auto"
    run = tmp_path / "run"
    assert main(["train", "--data-root", str(data), "--out", str(run), "--epochs", "1", "--recipe", "fast",
                 "--cache-dir", str(tmp_path / "cache")] + flags) == 0
    assert "--input-size auto: 256 px" in capsys.readouterr().out   # the generated images are small: the floor
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["input_size"] == 256
    assert config["windows"]["32"] == 5 and config["windows"]["16"] == 3
    with pytest.raises(SystemExit):
        main(["train", "--data-root", str(data), "--out", str(tmp_path / "r2"), "--input-size", "big"])
    assert "expected a side in pixels (e.g. 384) or auto; got 'big'" in capsys.readouterr().err


def error_of(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_clear_errors(tmp_path, data, capsys):
    train = ["train", "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")] + TINY_FLAGS
    assert "does not exist" in error_of(train + ["--data-root", str(tmp_path / "nowhere")], capsys)
    assert "nope" in error_of(train + ["--data-root", str(data), "--classes", "fabric,nope"], capsys)
    empty = tmp_path / "empty_train"
    (empty / "a" / "train" / "good").mkdir(parents=True)
    (empty / "a" / "test" / "good").mkdir(parents=True)
    assert "good" in error_of(train + ["--data-root", str(empty)], capsys)
    broken = tmp_path / "broken"
    make_dataset(broken, classes=("fabric",), n_train=2, n_test_good=1, n_test_defect=1)
    (broken / "fabric" / "train" / "good" / "001.png").write_bytes(b"not an image")
    assert "001.png" in error_of(train + ["--data-root", str(broken)], capsys)
    missing = error_of(["test", "--run", str(tmp_path / "no_run")], capsys)
    assert "not an rlr run folder" in missing or "does not exist" in missing
    old = tmp_path / "old_run"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"format_version": 0, "config": {}}))
    assert "another rlr version" in error_of(["test", "--run", str(old)], capsys)
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text(json.dumps({"format_version": 1, "config": {}}))
    assert "checkpoint" in error_of(["test", "--run", str(started)], capsys)
    resumed = error_of(["train", "--out", str(started), "--resume", "--lr", "1"], capsys)
    assert "holds no checkpoint to resume" in resumed


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_over(tmp_path, data, capsys):
    from _pipeline import TINY_SETTINGS
    from rlr.config import RLRConfig

    run = tmp_path / "run"
    run.mkdir()
    RLRConfig.from_recipe("fast", **dict(TINY_SETTINGS, epochs=1)).save(run)   # what a run killed that early leaves
    assert main(["train", "--out", str(run), "--resume", "--data-root", str(data), "--cache-dir",
                 str(tmp_path / "cache"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"{run} holds no checkpoint (the run stopped before its first epoch ended): --resume starts it from the " \
           f"beginning with the settings of its config.json" in out
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["heads"] == 2 and saved["epochs"] == 1 and saved["class_balance"] == 0.5   # its own, the fast recipe's
    assert (run / "checkpoint.pt").is_file() and (run / "threshold.json").is_file()
    assert "holds no checkpoint to resume" in error_of(["train", "--out", str(tmp_path / "new"), "--resume"], capsys)


def test_import_official_missing_file(tmp_path, capsys):
    assert "not found" in error_of(["import-official", str(tmp_path / "none.pth"), "--out", str(tmp_path / "x")], capsys)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "test", "predict", "import-official", "demo"):
        assert command in out


def test_demo_smoke(tmp_path, capsys):
    from rlr.demo import run_demo

    tiny = dict(backbone_weights="random", input_size=64, heads=2, layers=1, d_models=(16, 32),
                windows={8: 3, 4: 3}, backend="reference")
    metrics = run_demo(tmp_path / "demo", epochs=1, progress=False,
                       data=dict(size=64, n_train=2, n_test_good=1, n_test_defect=2, classes=["fabric", "cup"]),
                       config_overrides=tiny)
    assert set(metrics["classes"]) == {"fabric", "cup"}
    assert (tmp_path / "demo" / "run" / "report.html").is_file()
    out = capsys.readouterr().out
    assert "I-AUROC" in out and "report:" in out
