#!/usr/bin/env bash
# The GPU benchmark, for a machine lent by the `device` tool (or any CUDA machine whose python3
# has torch, transformers and pytest; moee and moee-lab need not be installed: they run from
# src/ and lab/src/).
#
# Prepare here first (the GPU machine gets the git working tree only, and has no internet):
#   moee demo                                                  # -> runs/demo/moe
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/       # all four files
# then run this script there, carrying the two ignored folders:
#   device run  carry=[".data", "runs/demo/moe"]  command="bash benchmarks/gpu_bench.sh"
# Each part runs under its own time limit and a failing part does not stop the next; results
# and one log (run.log) land in $OUT (the device tool's output folder) or runs/bench-gpu.
set -uo pipefail
export PYTHONPATH=src:lab/src MOEE_DATA_DIR=.data/fashion-mnist PYTHONUNBUFFERED=1
out=${OUT:-runs/bench-gpu}
mkdir -p "$out"
log="$out/run.log"
part() {  # part NAME SECONDS COMMAND...: run, append to run.log, report time and status
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s)" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$log"
}
{ python3 -c "import torch, transformers; print('torch', torch.__version__, '| CUDA',
torch.version.cuda, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; } | tee -a "$log"
part tests "${T_TESTS:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_moe.py
# Blocks, embedded default and DeiT-base-sized model, fp32 and bf16 (bench.json after each part).
part bench "${T_BENCH:-200}" python3 -m moee_lab.bench.suite --device cuda --dtypes float32,bfloat16 \
    --default-batches 1,8,64,256 --deit-batches 1,8,32,64 --out "$out"
part decode "${T_DECODE:-120}" python3 benchmarks/gpu_decode.py --new 32 --out "$out"
part profile "${T_PROFILE:-60}" python3 benchmarks/experiments/gpu_profile.py --batches 8,64 --out "$out"
