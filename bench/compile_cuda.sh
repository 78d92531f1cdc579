#!/usr/bin/env bash
# Compile the CUDA copy kernels with nvcc (compile only; nothing runs), so they cannot rot.
#   bench/compile_cuda.sh [OUT_DIR]     default OUT_DIR: a temporary directory, removed after
# KVCORE_CUDA_ARCHS="80;90" picks the GPU targets (the last one is also embedded as PTX).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  echo "compile_cuda.sh: nvcc not found on PATH" >&2
  exit 2
fi
OUT="${1:-}"
if [[ -z "$OUT" ]]; then
  OUT="$(mktemp -d)"
  trap 'rm -rf "$OUT"' EXIT
fi
mkdir -p "$OUT"
IFS=';, ' read -r -a ARCHS <<< "${KVCORE_CUDA_ARCHS:-80;90}"
GENCODE=()
for a in "${ARCHS[@]}"; do
  [[ -n "$a" ]] && GENCODE+=(-gencode "arch=compute_${a},code=sm_${a}")
done
LAST="${ARCHS[${#ARCHS[@]}-1]}"
GENCODE+=(-gencode "arch=compute_${LAST},code=compute_${LAST}")
"$NVCC" --version | tail -1
set -x
"$NVCC" -O3 -std=c++17 -shared -Xcompiler -fPIC,-Wall --cudart static "${GENCODE[@]}" \
  -I"$ROOT/csrc" "$ROOT"/csrc/*.cu -o "$OUT/libkvcopy_cuda.so"
{ set +x; } 2>/dev/null
echo "compile_cuda.sh: OK ($OUT/libkvcopy_cuda.so)"
