#!/usr/bin/env bash
# Fetch, where pip can reach an index, the pure-Python packages a GPU machine without internet lacks for the GPU
# check: the benchmark peers (Liger-Kernel, Apple's Cut Cross-Entropy), expecttest (torch.library.opcheck
# imports it) and setuptools >= 77 (pyproject.toml's SPDX licence; the install there builds without isolation).
# Wheels go to .whl/ (git-ignored); carry that folder to the GPU machine, where scripts/gpu_check.sh
# installs them before anything else. Usage: scripts/gpu_wheels.sh [python version of the GPU machine, default
# 3.12]. Extra names (NAME or NAME==VERSION) may follow the version.
set -euo pipefail
version=${1:-3.12}
shift || true
packages=(expecttest liger-kernel cut-cross-entropy "setuptools>=77" "$@")
rm -rf .whl
# --no-deps: their own needs (torch, triton) are on the GPU machine already; pure-Python wheels fit any platform.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${packages[@]}"
ls -l .whl
