#!/usr/bin/env bash
# The project's one-command GPU check: install into the machine's existing PyTorch (no downloads), run the
# test suite on the GPU, then every benchmark. Usage: scripts/gpu_check.sh [tests|bench|all] (default all).
# Results go to $VIDEOBERT_BENCH_OUT (default bench/results/<gpu>/<date>/), the test log beside them.
# For a time-boxed machine: GPU_CHECK_TESTS (test paths, default tests), GPU_CHECK_BENCHES (scripts, default
# every bench/*.py but common.py, profile_* and the pytest-benchmark test_*), GPU_CHECK_BENCH_ARGS (e.g.
# --quick), GPU_CHECK_STEP_S (seconds per step before it is stopped, default none) and GPU_CHECK_ARCHIVE (a
# .tgz of the results folder, rewritten after every step so that a stopped run still returns what it finished).
set -uo pipefail
what=${1:-all}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || exit 1
"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
  torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')" || exit 1
# --no-deps --no-index: the GPU machine has no internet and already holds torch and triton.
"$python" -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
log_dir=${VIDEOBERT_BENCH_OUT:-.}
mkdir -p "$log_dir"
step=()
[ -n "${GPU_CHECK_STEP_S:-}" ] && step=(timeout "$GPU_CHECK_STEP_S")
archive() {
  [ -n "${GPU_CHECK_ARCHIVE:-}" ] && tar czf "$GPU_CHECK_ARCHIVE" -C "$log_dir" .
  return 0
}
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  # Compile checks are CPU-only (they target sm_80/sm_90 without a GPU) and already run in CI.
  # shellcheck disable=SC2086  (test paths are a list)
  "${step[@]}" "$python" -m pytest -q -p no:cacheprovider ${GPU_CHECK_TESTS:-tests} \
    --ignore=tests/test_compile_triton.py 2>&1 | tee "$log_dir/gpu_tests.log" | tail -n 40
  status=${PIPESTATUS[0]}
  archive
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  for script in ${GPU_CHECK_BENCHES:-bench/*.py}; do
    case $(basename "$script") in common.py|profile_*|test_*) continue;; esac
    echo "== $script"
    # shellcheck disable=SC2086
    "${step[@]}" "$python" "$script" ${GPU_CHECK_BENCH_ARGS:-} 2>&1 | tee "$log_dir/$(basename "$script" .py).log" \
      | tail -n 80
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    archive
  done
fi
exit "$status"
