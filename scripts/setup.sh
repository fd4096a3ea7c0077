#!/usr/bin/env bash
# Makes .venv with PyTorch and ssgan-dist (editable).
#
#   scripts/setup.sh                 what the demo needs: the package and TensorBoard
#   scripts/setup.sh --dev           everything the tests need (what CI installs): every extra
#                                    (FID, SketchyCOCO, DeepSpeed, SLURM launcher, DALI) and the test tools
#   scripts/setup.sh --extras LIST   the package with these extras, e.g. --extras eval,dali-cuda12
#
# torch is installed first, pinned: a bare "torch" requirement on a machine without it would
# pull a multi-GB CUDA build where a CPU wheel is what the machine has (TORCH_SPEC picks
# another build, e.g. a CUDA one on a GPU machine). Every later install names the torch that
# is in .venv, so no extra replaces it (torch-fidelity's torchvision would pull a newer torch).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="tensorboard"
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) extras="dev" ;;
    --extras) extras="${2:?--extras needs a comma-separated list}"; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scripts/setup.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
  shift
done
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
torch_pin="torch==$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null)"
.venv/bin/python -m pip install --quiet -e ".[$extras]" "$torch_pin"
