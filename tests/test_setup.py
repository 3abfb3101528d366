"""setup.py's CUDA toolkit discovery (the build itself is exercised by CI's install)."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def load_find_cuda_home():
    tree = ast.parse(SETUP.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "find_cuda_home")
    namespace = {"os": os, "re": re, "shutil": shutil}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(SETUP), "exec"), namespace)
    return namespace["find_cuda_home"]


def make_toolkit(root: Path) -> Path:
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / "bin").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    return root


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    (tmp_path / "path").mkdir()
    return tmp_path


def test_wrapper_script_on_path_leads_to_the_real_toolkit(clean_env):
    toolkit = make_toolkit(clean_env / "cuda-13.0")
    wrapper = clean_env / "path" / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    assert load_find_cuda_home()() == str(toolkit)


def test_symlinked_nvcc_and_cuda_home(clean_env, monkeypatch):
    toolkit = make_toolkit(clean_env / "cuda")
    (clean_env / "path" / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    assert load_find_cuda_home()() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert load_find_cuda_home()() == str(toolkit)


def test_no_toolkit(clean_env, monkeypatch):
    assert load_find_cuda_home()() is None                # no nvcc at all
    monkeypatch.setenv("CUDA_HOME", str(clean_env))       # a folder without include/cuda_runtime.h
    assert load_find_cuda_home()() is None


# ------------------------------------------------------------------------------------------
# The Makefile's set-up (make demo / make test): what it says when a prerequisite is missing.

REPO = SETUP.parent


def make_stamp(tmp_path, **variables):
    """Run only the set-up recipe, into a stamp under tmp_path; nothing is installed on failure."""
    args = [f"{k}={v}" for k, v in variables.items()] + [f"STAMP={tmp_path}/installed", f"{tmp_path}/installed"]
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_names_a_python_that_is_too_old(tmp_path):
    old = tmp_path / "python-3.8"
    old.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exec {sys.executable} -c '
                   f'"import sys; sys.version_info = (3, 8, 0); sys.version = \'3.8.0\'; $2"\nexec {sys.executable} "$@"\n')
    old.chmod(0o755)
    result = make_stamp(tmp_path, PYTHON=old)
    assert result.returncode != 0
    assert f"make: Python 3.10 or newer is needed, {old} is 3.8.0: install a newer one" in result.stderr
    assert not (tmp_path / "installed").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_names_a_missing_compiler(tmp_path):
    result = make_stamp(tmp_path, PYTHON=sys.executable, CXX="no-such-c++")
    assert result.returncode != 0
    assert "make: no C++ compiler (no-such-c++) found: install one (e.g. apt-get install g++), or set CXX" in result.stderr
    assert not (tmp_path / "installed").exists()
