#!/usr/bin/env bash
# The GPU benchmark, for a machine lent by the `device` tool (or any CUDA machine whose python3
# has torch and transformers; moee itself need not be installed: it runs from src/).
#
# Prepare here first (the GPU machine gets the git working tree only, and has no internet):
#   moee demo                                                  # -> runs/demo/moe
#   mkdir -p .data && cp -r /usr/share/datasets/fashion-mnist .data/
# then run this script there, carrying the two ignored folders:
#   device run  carry=[".data", "runs/demo/moe"]  command="bash benchmarks/gpu_bench.sh"
# Results land in $OUT (the device tool's output folder) or runs/bench-gpu.
set -euo pipefail
export PYTHONPATH=src MOEE_DATA_DIR=.data/fashion-mnist PYTHONUNBUFFERED=1
out=${OUT:-runs/bench-gpu}
mkdir -p "$out"
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers',
transformers.__version__, '|', torch.cuda.get_device_name())" | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >> "$out/versions.txt" || true
# Blocks, embedded default and DeiT-base-sized model, fp32 and bf16; bench.json after each part.
python3 -m moee.cli bench --device cuda --dtypes float32,bfloat16 \
    --default-batches 1,8,64,256 --deit-batches 1,8,64 --out "$out" 2>&1 | tee "$out/bench.log"
python3 benchmarks/compare_checkpoints.py runs/demo/moe --device cuda --dtype bfloat16 \
    --calibrate --batches 1,8,64,256 2>&1 | tee "$out/compare-bf16.log"
