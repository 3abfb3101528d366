#!/usr/bin/env bash
# The old end of the supported range, proven on a CPU machine: a second environment with the
# oldest torch and triton installable here, the C++ extension built against that torch, and the
# tests that need neither timm nor torchvision (kernels: reference, cpp, triton through
# TRITON_INTERPRET=1; model and pipeline pieces).
#
#   bash tools/old_versions.sh [ENV_DIR [PYTEST_ARGS...]]   # default ENV_DIR: ~/.cache/rlr-old-env
#
# Versions: torch 2.13.0 (the CPU wheel pip finds in /opt/wheels on the project's machines) and
# triton 3.6.0 (PyPI). torchvision is left out on purpose: the PyPI torchvision 0.28.0 wheel is a
# CUDA build and fails on import against the 2.13.0 CPU torch ("operator torchvision::nms does not
# exist"), and timm imports torchvision, so tests marked `timm` are deselected here.
# numpy < 2.4: triton 3.6's interpreter calls int() on one-element arrays, which numpy 2.4 turned
# from a deprecation into a TypeError (triton 3.8's interpreter no longer does; GPU runs never use it).
# The environment is kept between runs (pip skips what is installed); the sources are copied
# into ENV_DIR/src and built there, so the checkout's own extension is never touched.
# Not run by CI: see docs/extension.md ("Supported torch and triton versions").
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
env_dir=${1:-"$HOME/.cache/rlr-old-env"}
[ "$#" -gt 0 ] && shift   # the rest goes to pytest
torch_version=${RLR_OLD_TORCH:-2.13.0}
triton_version=${RLR_OLD_TRITON:-3.6.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1

start=$SECONDS
[ -x "$env_dir/bin/python" ] || python3 -m venv "$env_dir"
py="$env_dir/bin/python"
"$py" -m pip install -q "torch==$torch_version" "triton==$triton_version" setuptools wheel ninja \
  "numpy<2.4" scipy scikit-learn scikit-image matplotlib pillow tqdm pytest
"$py" -c "import torch, triton; print(f'old_versions: torch {torch.__version__}, triton {triton.__version__}')"

src="$env_dir/src"
mkdir -p "$src"
# A fresh copy, but the object files of the last build stay: ninja recompiles only changed sources.
find "$src" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
# Tracked and untracked-but-not-ignored files: what a commit of this working tree would hold.
(cd "$repo" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - 2>/dev/null) | tar -xf - -C "$src"
echo "old_versions: environment ready after $((SECONDS - start)) s; building rlr_kernels._C against torch $torch_version"

cd "$src"
build_start=$SECONDS
RLR_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$py" setup.py -q build_ext --inplace >build.log 2>&1 \
  || { tail -n 40 build.log >&2; echo "old_versions: the extension build failed" >&2; exit 1; }
echo "old_versions: extension built in $((SECONDS - build_start)) s"
PYTHONPATH="$src" "$py" -c "import sys, rlr_kernels; sys.exit(0 if 'cpp' in rlr_kernels.available_backends('cpu') else 'old_versions: rlr_kernels._C does not load')"

set +e
PYTHONPATH="$src" TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider -m "not slow and not timm" "$@" 2>&1
status=$?
set -e
[ "$status" -eq 5 ] && { echo "old_versions: pytest collected no tests" >&2; status=1; }
echo "old_versions: torch $torch_version / triton $triton_version: pytest exit $status after $((SECONDS - start)) s in all"
exit "$status"
