#!/usr/bin/env bash
# The Triton-kernel session on one CUDA GPU (svdq/DESIGN.md §16): gpu-marked kernel tests with the kernels
# on, then the kernel and MoE-layer benchmarks with both backends side by side, then a profile. Each step
# has its own time limit and the next runs whatever the last did; everything lands in $OUT/kernels.tgz,
# rewritten after every step (so a run cut short still returns what it finished).
#   bash bench/gpu_kernels.sh [steps...]     steps: tests act gemm moe8 moe64 calib profile (default: all)
# With megatron-core / modelopt as wheels in .whl (no network): they are installed into /tmp/site first.
set -uo pipefail
OUT=${OUT:-/tmp/out}; K=/tmp/svdq-kernels/k; rm -rf "$K"; mkdir -p "$OUT" "$K"
if [ -d .whl ] && ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
FINAL=$OUT; export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT="$K"
steps=("$@"); [ ${#steps[@]} = 0 ] && steps=(tests act gemm moe8 moe64 calib profile)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$K/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$K/gpu.txt"
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($limit s): $*"; local t0=$SECONDS
  timeout "$limit" "$@" > "$K/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0)) s"; tail -n "${TAIL:-20}" "$K/$name.log"
  tar -C "$(dirname "$K")" -czf "$FINAL/kernels.tgz.tmp" k && mv "$FINAL/kernels.tgz.tmp" "$FINAL/kernels.tgz"; }
for s in "${steps[@]}"; do case $s in
  tests) SVDQ_KERNELS=auto step tests "${T_TESTS:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider -rfE \
           --tb=short ${TESTS:-tests/svdq/kernels tests/lora/test_grouped_svdq.py tests/svdq/experts} ;;
  act) step act "${T_ACT:-60}" python3 bench/bench_kernels_act.py ;;
  gemm) step gemm "${T_GEMM:-120}" python3 bench/bench_kernels_gemm.py ${GEMM_ARGS:-} ;;
  moe8) step moe8 "${T_MOE:-150}" python3 bench/bench_lora_moe.py --shapes mixtral-half --kernels ${MOE_KERNELS:-torch auto triton} \
          --no-fake --name lora_moe_gpu_kernels_mixtral-half ;;
  moe64) step moe64 "${T_MOE64:-150}" python3 bench/bench_lora_moe.py --shapes fine-64 --kernels torch auto triton \
          --no-fake --steps 6 --warmup 2 --name lora_moe_gpu_kernels_fine-64 ;;
  calib) step calib "${T_CALIB:-120}" python3 bench/bench_calib_speed.py --layers "${CALIB_LAYERS:-1}" --repeats 2 ;;
  profile) step profile "${T_PROF:-90}" python3 bench/profile_lora_moe.py --shape mixtral-half --presets moe --rows ${PROF_ROWS:-12} \
             --out "$K/profile_lora_moe.txt" ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
