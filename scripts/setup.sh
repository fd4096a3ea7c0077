#!/usr/bin/env bash
# Creates .venv with PyTorch and ssgan-dist (editable, with the test, SLURM-launcher and DeepSpeed extras).
# torch is pinned and installed first: a bare "torch" requirement on a machine without it
# would pull a multi-GB CUDA build where a CPU wheel is what the machine has.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[dev,cluster,deepspeed]"
# FID's InceptionV3; --no-deps: its torchvision dependency would replace the CPU torch and is unused here
.venv/bin/python -m pip install --quiet --no-deps "torch-fidelity==0.4.0"
