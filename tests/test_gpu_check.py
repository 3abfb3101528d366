"""tools/gpu_check.sh's own logic, through its --dry-run (no GPU work): steps, paths, parsing."""
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"


def dry_run(out: Path, **env):
    environ = dict(os.environ, PYTHONPATH=str(REPO), **env)
    result = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True,
                            env=environ, timeout=600)
    return result, json.loads((out / "results.json").read_text())


def test_a_failing_step_is_recorded_and_the_next_one_still_runs(tmp_path):
    result, report = dry_run(tmp_path / "out", GPU_CHECK_STEPS="weights,bench_kernels,bench_end_to_end",
                             GPU_CHECK_FAIL_STEP="bench_kernels")
    assert result.returncode != 0, result.stdout
    assert report["dry_run"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["weights", "bench_kernels", "bench_end_to_end"]
    assert steps["weights"]["status"] == "passed"
    assert steps["bench_kernels"]["status"] == "failed" and steps["bench_kernels"]["exit_code"] == 1
    assert "error" in steps["bench_kernels"]["figures"]               # it wrote no bench results
    rows = steps["bench_end_to_end"]["figures"]
    assert steps["bench_end_to_end"]["status"] == "passed" and rows["rows"] > 0 and rows["median_ms"][0]["median_ms"] > 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["bench.tar.gz", "gpu_check.log", "results.json"]  # the bench folder packed into one file
    with tarfile.open(tmp_path / "out" / "bench.tar.gz") as archive:
        assert "bench/end_to_end/results.json" in archive.getnames()
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert " -m bench --device cuda --quick" in log                     # the real command is shown
    assert "=== step bench_kernels: failed (exit 1)" in log


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    result, report = dry_run(tmp_path / "out", GPU_CHECK_STEPS="bench_kernels,bench_end_to_end",
                             GPU_CHECK_BUDGET_S="0")
    assert result.returncode != 0
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("bench_kernels", "skipped"),
                                                                   ("bench_end_to_end", "skipped")]


def test_bad_arguments_are_named(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown option --frobnicate" in result.stderr
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 2 and "usage: bash tools/gpu_check.sh OUT_DIR" in result.stderr


@pytest.mark.slow
def test_full_dry_run_passes(tmp_path):
    """What CI runs directly (.ci/run): every step's stand-in, pytest collecting the cuda selection."""
    result, report = dry_run(tmp_path / "out")
    assert result.returncode == 0, result.stdout[-3000:]
    assert [s["name"] for s in report["steps"]] == ["env", "weights", "install", "tests", "bench_kernels",
                                                    "roofline", "bench_end_to_end"]
    assert all(s["status"] == "passed" for s in report["steps"])
    assert report["steps"][0]["figures"]["torch"]
    assert "reference" in report["steps"][2]["figures"]["backends_cuda"]
    assert (tmp_path / "out" / "pytest.xml").exists()
    roofline = report["steps"][5]["figures"]                          # predictions only: no GPU timed
    assert roofline["launches"] > 0 and roofline["median_measured_over_predicted"] is None
    assert json.loads((tmp_path / "out" / "roofline.json").read_text())["rows"][0]["predicted_us_h100"] > 0
