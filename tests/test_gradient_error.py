"""tools/gradient_error.py: the bf16-against-float32 gradient check of docs/recipes.md runs on a real run."""
import os

import pytest
import torch

from _pipeline import make_dataset, tiny_config
from rlr.train import train

pytestmark = pytest.mark.timm   # the lite0 backbone: timm, which imports torchvision

pytest.importorskip("rlr_kernels._C", reason="the cpp extension is not built")

@pytest.fixture(scope="module")
def script():
    from tools import gradient_error

    return gradient_error


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(run folder, data root, feature cache) of a 1-epoch tiny run."""
    root = tmp_path_factory.mktemp("gradient_error")
    data = make_dataset(root / "data")
    train(root / "run", data, tiny_config(epochs=1), cache_dir=root / "cache", progress=False, log=lambda *_: None)
    return root / "run", data, root / "cache"


def test_relative_errors_are_zero_for_equal_and_exact_for_scaled_gradients(script):
    want = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    total, per_parameter = script.relative_errors(want, want)
    assert total == 0 and per_parameter == {"a": 0.0, "b": 0.0}
    total, per_parameter = script.relative_errors({"a": 2 * want["a"], "b": want["b"]}, want)
    assert total == pytest.approx(1.0) and per_parameter["a"] == pytest.approx(1.0)


def test_script_compares_bf16_gradients_with_float32_and_restores_the_environment(script, tiny_run, monkeypatch,
                                                                                   capsys):
    monkeypatch.delenv("RLR_CPU_AMX", raising=False)
    run, data, cache = tiny_run
    script.main(["--run", str(run), "--data-root", str(data), "--batches", "2", "--cache-dir", str(cache)])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if "relative gradient error per batch" in line]
    from rlr_kernels.cpp import masked_amx_available

    assert len(rows) == (2 if masked_amx_available() else 1)
    assert rows[-1].startswith("bf16, float32-compute attention")
    for row in rows:
        errors = [float(e) for e in row.split("per batch ")[1].split()]
        assert len(errors) == 2 and all(0 < e < 0.5 for e in errors)   # bf16 rounding: not zero, not garbage
    assert "RLR_CPU_AMX" not in os.environ


def test_script_names_a_batch_count_the_training_set_cannot_fill(script, tiny_run, capsys):
    run, data, cache = tiny_run
    with pytest.raises(SystemExit):
        script.main(["--run", str(run), "--data-root", str(data), "--batches", "3", "--cache-dir", str(cache)])
    assert "--batches must be from 1 to 2" in capsys.readouterr().err
