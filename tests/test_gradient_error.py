"""docs/gradient_error.py: the bf16-against-float32 gradient check of docs/recipes.md runs on a real run."""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

from _pipeline import make_dataset, tiny_config
from rlr.train import train

pytest.importorskip("rlr_kernels._C", reason="the cpp extension is not built")

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "gradient_error.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gradient_error", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_relative_errors_are_zero_for_equal_and_exact_for_scaled_gradients(script):
    want = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    total, per_parameter = script.relative_errors(want, want)
    assert total == 0 and per_parameter == {"a": 0.0, "b": 0.0}
    total, per_parameter = script.relative_errors({"a": 2 * want["a"], "b": want["b"]}, want)
    assert total == pytest.approx(1.0) and per_parameter["a"] == pytest.approx(1.0)


def test_script_compares_bf16_gradients_with_float32_and_restores_the_environment(script, tmp_path, monkeypatch,
                                                                                   capsys):
    monkeypatch.delenv("RLR_CPU_AMX", raising=False)
    data = make_dataset(tmp_path / "data")
    train(tmp_path / "run", data, tiny_config(epochs=1), cache_dir=tmp_path / "cache", progress=False,
          log=lambda *_: None)
    script.main(["--run", str(tmp_path / "run"), "--data-root", str(data), "--batches", "2",
                 "--cache-dir", str(tmp_path / "cache")])
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if "relative gradient error per batch" in line]
    from rlr_kernels.cpp import masked_amx_available

    assert len(rows) == (2 if masked_amx_available() else 1)
    assert rows[-1].startswith("bf16, float32-compute attention")
    for row in rows:
        errors = [float(e) for e in row.split("per batch ")[1].split()]
        assert len(errors) == 2 and all(0 < e < 0.5 for e in errors)   # bf16 rounding: not zero, not garbage
    assert "RLR_CPU_AMX" not in os.environ
