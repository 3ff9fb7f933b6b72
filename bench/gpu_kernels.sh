#!/usr/bin/env bash
# The Triton-kernel session on one CUDA GPU (svdq/DESIGN.md §16): gpu-marked kernel tests with the kernels
# on, then the kernel and MoE-layer benchmarks with both backends side by side, then a profile. Each step
# has its own time limit and the next runs whatever the last did; everything lands in $OUT (one tarball).
#   bash bench/gpu_kernels.sh [steps...]     steps: tests act gemm moe profile (default: all)
# With megatron-core / modelopt as wheels in .whl (no network): they are installed into /tmp/site first.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/k"
if [ -d .whl ] && ! python3 -c "import megatron.core" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT="$OUT/k"
steps=("$@"); [ ${#steps[@]} = 0 ] && steps=(tests act gemm moe profile)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/k/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/k/gpu.txt"
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($limit s): $*"; local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/k/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0)) s"; tail -n 25 "$OUT/k/$name.log"; }
for s in "${steps[@]}"; do case $s in
  tests) SVDQ_KERNELS=auto step tests "${T_TESTS:-240}" python3 -m pytest -m gpu -q -p no:cacheprovider -rfE \
           tests/svdq/kernels tests/lora/test_grouped_svdq.py tests/svdq/experts ;;
  act) step act "${T_ACT:-60}" python3 bench/bench_kernels_act.py ;;
  gemm) step gemm "${T_GEMM:-120}" python3 bench/bench_kernels_gemm.py ;;
  moe) step moe "${T_MOE:-200}" python3 bench/bench_lora_moe.py --kernels torch auto --name lora_moe_gpu_kernels ;;
  profile) step profile "${T_PROF:-90}" python3 bench/profile_lora_moe.py --shape mixtral-half --presets none moe \
             --out "$OUT/k/profile_lora_moe.txt" ;;
  *) echo "unknown step $s"; exit 2 ;;
esac; done
tar -C "$OUT" -czf "$OUT/kernels.tgz" k && rm -rf "$OUT/k"
