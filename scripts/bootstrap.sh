#!/usr/bin/env bash
# Creates the virtual environment VENV (default .venv) with this package and its test dependencies.
# Where no NVIDIA GPU is visible, the CPU build of torch is installed first, since a plain `torch`
# requirement would pull a multi-GB CUDA build. Safe to re-run.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    # The CPU wheel (kept on local disk on our dev/CI machines); PyTorch's CPU index elsewhere.
    "${pip[@]}" torch==2.13.0 2>/dev/null || "${pip[@]}" torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
# Built with this environment's setuptools (no isolated build environment to fetch); the CUDA library is built
# when nvcc is present and needs no torch at build time.
"${pip[@]}" "setuptools>=77" wheel
"${pip[@]}" --no-build-isolation -e ".[dev]"
