#!/usr/bin/env bash
# Everything that needs the GPU, in one device call: install, the GPU tests, the benchmarks.
#   bash benchmarks/gpu_suite.sh [tests] [cca] [attention] [generation]    (default: all)
# Logs and markdown tables go to $OUT (the device tool brings that folder back).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sparsek-gpu}
mkdir -p "$OUT"
steps=${*:-"tests cca attention generation"}

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
if ! (cd /tmp && python3 -c "import sparsek.kernels") 2>/dev/null; then
  echo "editable install not importable; using a symlinked package on PYTHONPATH"
  mkdir -p /tmp/pkg/sparsek
  for d in cli convert runtime kernels; do ln -sfn "$PWD/$d" "/tmp/pkg/sparsek/$d"; done
  export PYTHONPATH=/tmp/pkg
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} | tee "$OUT/env.txt"

for step in $steps; do
  echo "=== $step"
  case $step in
    tests)
      timeout ${TESTS_TIMEOUT:-300} python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_sparsek_triton.py \
        tests/test_cca_triton.py tests/test_packed_sequences.py tests/test_decode_kernel.py tests/test_generation.py \
        tests/test_caches.py tests/test_model_integration.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    cca)
      timeout ${CCA_TIMEOUT:-150} python3 -m sparsek.kernels.cca_triton_bench 32768 131072 2>&1 | tee "$OUT/cca_bench.log" | tail -30 ;;
    attention)
      timeout 240 python3 benchmarks/attention.py --lengths 8192,32768,131072 --skip sdpa-flash,flex \
        --out "$OUT/attention.md" 2>&1 | tee "$OUT/attention.log" | tail -30 ;;
    generation)
      timeout ${GEN_TIMEOUT:-240} python3 benchmarks/generation.py --out "$OUT/generation.md" 2>&1 | tee "$OUT/generation.log" | tail -30 ;;
    *) echo "unknown step $step" ;;
  esac
done
