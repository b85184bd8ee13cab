#!/usr/bin/env bash
# Idempotent setup: Fashion-MNIST (Debian package), a venv with the CPU build of torch, moee
# and moee-lab.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; } >/dev/null \
    || echo "setup.sh: could not install dataset-fashion-mnist; the demo will say how to get it"
fi
[ -d .venv ] || python3 -m venv .venv
.venv/bin/pip install -q -r requirements-cpu.txt   # torch==2.13.0, the CPU build
# The library with its test tools and the ONNX export's engines (ONNX Runtime, OpenVINO), and
# moee-lab (the demo, study, bench and analyze commands).
.venv/bin/pip install -q -e ".[dev,onnx]" -e ./lab
