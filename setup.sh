#!/usr/bin/env bash
# One-time setup: Fashion-MNIST (Debian package), a venv with the CPU build of torch, moee itself.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist
fi
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q torch==2.13.0
pip install -q -e ".[dev]"
