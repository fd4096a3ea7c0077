#!/usr/bin/env bash
# The GPU checks of one device session, as one prepared script (see BENCHMARKS.md):
# bf16 + channels_last throughput, phases, memory with/without gradient checkpointing and MFU
# at 256x256 for SSGAN and the SPADE baseline, then a short fp16 run (loss scalers on CUDA).
# The device machine has torch but not webdataset/braceexpand: carry their wheels in
# shared/wheels (pip download --no-deps webdataset braceexpand) and this installs them.
set -euo pipefail
OUT="${OUT:-/tmp/ssgan-gpu}"
mkdir -p "$OUT"
if ! python -c "import webdataset, braceexpand" 2>/dev/null; then
  pip install --no-deps --no-index --find-links shared/wheels webdataset braceexpand >/dev/null
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python bench/train_throughput.py --config sketchycoco-256 --precision bf16 --channels-last \
  --batch 8 --steps 10 --warmup 3 --workers 4 --json "$OUT/bf16-256.json" | tee "$OUT/bf16-256.md"
python -m ssgan_dist.train train.precision=fp16 train.max_steps=30 train.progress=false \
  run.dir="$OUT/fp16-demo" 2>&1 | tail -n 3 | tee "$OUT/fp16-demo.txt"
