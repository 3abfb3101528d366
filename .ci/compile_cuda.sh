#!/usr/bin/env bash
# Compile every CUDA source of the extension (nothing runs: CI has no GPU), so that a broken CUDA
# build fails CI. Each csrc/cuda/*.cu goes through nvcc -c with the flags torch's build uses;
# each csrc/cuda/*.cpp (the torch bindings) is compiled with the host compiler against torch and
# the CUDA headers. Objects go to a temporary folder that is removed afterwards.
#
# Env: CUDA_HOME (toolkit folder; default: the one the nvcc on PATH belongs to),
#      TORCH_CUDA_ARCH_LIST (default "9.0": H100/H200), CXX (default c++),
#      PTXAS_LOG (a file: ptxas -v's report of every kernel, registers, spills, stack and shared memory,
#      is written there; tools/kernel_resources.py reads it),
#      COMPILE_CUDA_SKIP_CPP=1 (skip the host compile of the bindings).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${CUDA_HOME:-}" ]; then
  command -v nvcc >/dev/null 2>&1 || { echo "compile_cuda: no CUDA_HOME and no nvcc on PATH" >&2; exit 1; }
  real_nvcc=$(grep -o '/[^ "]*/bin/nvcc' "$(command -v nvcc)" | head -n 1 || true)
  [ -n "$real_nvcc" ] || real_nvcc=$(readlink -f "$(command -v nvcc)")
  CUDA_HOME=$(dirname "$(dirname "$real_nvcc")")
fi
NVCC="$CUDA_HOME/bin/nvcc"
[ -x "$NVCC" ] || { echo "compile_cuda: $NVCC not found (CUDA_HOME=$CUDA_HOME)" >&2; exit 1; }

gencode=()
for arch in ${TORCH_CUDA_ARCH_LIST:-9.0}; do
  arch=${arch%+PTX}
  num=${arch//./}
  gencode+=("-gencode=arch=compute_${num},code=sm_${num}")
done

# Same defines as torch.utils.cpp_extension's CUDA build (half operators off, relaxed constexpr).
nvcc_flags=(-std=c++17 -O3 -lineinfo -Xcompiler -fPIC --expt-relaxed-constexpr -Werror all-warnings
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__
  -D__CUDA_NO_HALF2_OPERATORS__ "${gencode[@]}")

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [ -n "${PTXAS_LOG:-}" ]; then
  nvcc_flags+=(-Xptxas -v)
  : >"$PTXAS_LOG"
fi
status=0
shopt -s nullglob
for src in csrc/cuda/*.cu; do
  start=$SECONDS
  if "$NVCC" "${nvcc_flags[@]}" -c "$src" -o "$out/$(basename "$src").o" 2>"$out/stderr"; then
    [ -z "${PTXAS_LOG:-}" ] || cat "$out/stderr" >>"$PTXAS_LOG"
    grep -v "^ptxas info\|^    [0-9]* bytes stack frame" "$out/stderr" >&2 || true
    echo "compile_cuda: ok   $src ($((SECONDS - start)) s)"
  else
    cat "$out/stderr" >&2
    echo "compile_cuda: FAIL $src" >&2
    status=1
  fi
done

cpp_srcs=(csrc/cuda/*.cpp)
[ "${COMPILE_CUDA_SKIP_CPP:-0}" != 1 ] || cpp_srcs=()
if [ "${#cpp_srcs[@]}" -gt 0 ]; then
  mapfile -t torch_inc < <(python -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))" 2>/dev/null)
  py_inc=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  inc_flags=(-I"$CUDA_HOME/include" -I"$py_inc")
  for p in "${torch_inc[@]}"; do inc_flags+=(-I"$p"); done
  for src in "${cpp_srcs[@]}"; do
    start=$SECONDS
    if "${CXX:-c++}" -std=c++20 -fPIC -fsyntax-only -Wall -DTORCH_EXTENSION_NAME=_C_cuda \
        -DTORCH_API_INCLUDE_EXTENSION_H "${inc_flags[@]}" "$src"; then
      echo "compile_cuda: ok   $src ($((SECONDS - start)) s)"
    else
      echo "compile_cuda: FAIL $src" >&2
      status=1
    fi
  done
fi
exit $status
