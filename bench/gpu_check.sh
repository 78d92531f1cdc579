#!/usr/bin/env bash
# One prepared GPU check for the batched-copy kernels, under five minutes on one GPU:
#   1. builds kvcore/_native/libkvcopy_cpu.so (g++) and libkvcopy_cuda.so (nvcc, this GPU's arch),
#   2. runs tests/test_copy_cuda.py (native CUDA required: missing library = failure) and
#      tests/test_copy.py,
#   3. runs `kvcore bench copy --json` (CPU and GPU GB/s vs memcpy / cudaMemcpyAsync) for block
#      sizes 16 and 128.
# Needs torch with CUDA, nvcc and g++; installs only small pure-Python deps if they are missing.
# Results go to $OUT (or out/gpu_check/): env.txt, tests.txt, bench_copy_bs16.json, bench_copy_bs128.json.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
RESULTS="${OUT:-$ROOT/out/gpu_check}"
mkdir -p "$RESULTS" kvcore/_native
START=$SECONDS
step() { echo "== [$((SECONDS - START))s] $*"; }

step "environment"
{
  nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv || true
  nvcc --version | tail -2 || true
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} 2>&1 | tee "$RESULTS/env.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'"

if ! "$PY" -c "import pluggy, pydantic_settings, yaml, xxhash, pytest" 2>/dev/null; then
  step "installing small pure-Python deps"
  timeout 120 "$PY" -m pip install -q pluggy pydantic pydantic-settings pyyaml xxhash pytest \
    || echo "WARNING: pip install failed; continuing"
fi

step "building native libraries"
g++ -O3 -std=c++17 -fPIC -shared -pthread -Icsrc csrc/*.cpp -o kvcore/_native/libkvcopy_cpu.so
ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')"
KVCORE_CUDA_ARCHS="${KVCORE_CUDA_ARCHS:-${ARCH:-90}}" bench/compile_cuda.sh kvcore/_native
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "from kvcore.copy import backend_info; print(backend_info())" | tee -a "$RESULTS/env.txt"

step "tests"
set +e
KVCORE_REQUIRE_NATIVE_CUDA=1 timeout 200 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_copy_cuda.py tests/test_copy.py 2>&1 | tail -40 | tee "$RESULTS/tests.txt"
TESTS_RC=${PIPESTATUS[0]}
set -e

for bs in 16 128; do
  step "kvcore bench copy --block-size $bs"
  timeout 60 "$PY" -m kvcore.cli.main bench copy --json --block-size "$bs" \
    | tee "$RESULTS/bench_copy_bs$bs.json"
done
step "done: tests exit status $TESTS_RC; results in $RESULTS"
exit "$TESTS_RC"
