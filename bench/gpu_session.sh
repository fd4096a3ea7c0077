#!/usr/bin/env bash
# The GPU checks of one device session, as one prepared script (results: BENCHMARKS.md).
#
#   bash bench/gpu_session.sh            # on the GPU machine, from the repository root; OUT=... for the results
#   bash bench/gpu_session.sh --dry-run  # here, on a CPU: every step at tiny sizes, 1 step each
#
# Checks, most important first, each in its own time slot so that one failure or hang leaves
# the others running; the whole session stays inside BUDGET_S (default 480 s = 8 minutes):
#   1. eager bf16 + channels_last, SSGAN at 256, batch 8: img/s, phases, peak memory, MFU (+ VGG)
#   2. the same compiled (train.compile), its compile cache cold
#   3. batch sweep 16 and 32, eager bf16 + channels_last
#   4. compiled again on the now warm cache: warm compile time, compiled step time
#   5. fp16 with its loss scalers (fused Adam skips on the device): throughput and a 30-step run
#   6. compiled == eager on the GPU (tests/test_compile.py: gradients, buffers, EMA)
#   7. 2 processes over NCCL (DDP, synchronized BatchNorm, bf16 gradient compression): only
#      when the machine has two GPUs
# COMPILE_CACHE=DIR keeps the compile cache between sessions (default: a fresh one, so check 2 is cold).
# Results: $OUT/results.json (every check: command, exit code, seconds, its JSON) rewritten
# after each check, so a cut-off session still returns what it measured; $OUT/session.log.
# The device has no webdataset/braceexpand and no network: their wheels are installed from
# $WHEELS, shared/wheels, ../shared/wheels or .whl (pip download --no-deps webdataset braceexpand).
set -uo pipefail

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUT="${OUT:-/tmp/ssgan-gpu-session}"
BUDGET_S="${BUDGET_S:-480}"
WORK="$(mktemp -d /tmp/ssgan-gpu.XXXXXX)"
START=$(date +%s)
mkdir -p "$OUT" "$WORK/results"
LOG="$OUT/session.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

log() { echo "[$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }

merge() {  # every check's record -> $OUT/results.json
  "$PY" - "$WORK/results" "$OUT/results.json" <<'EOF'
import json, sys
from pathlib import Path
records = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*.json"))]
Path(sys.argv[2]).write_text(json.dumps(records, indent=1))
EOF
}

# check NAME SLOT_S CMD...: runs CMD with at most SLOT_S seconds (less if the budget is short);
# an argument @RESULT@ becomes the file CMD may write its JSON to. Records name, command, exit
# code, seconds and that JSON.
check() {
  local name="$1" slot="$2"
  shift 2
  N=$((N + 1))
  local left=$((BUDGET_S - ($(date +%s) - START) - 10))
  local record="$WORK/results/$(printf '%02d' "$N")-$name.json"
  if ((left < 30)); then
    log "$name: skipped, ${left}s of the budget left"
    printf '{"check": "%s", "skipped": "no time left"}\n' "$name" >"$record"
    merge
    return
  fi
  ((slot > left)) && slot=$left
  local result="$WORK/$name.result.json" args=() a
  for a in "$@"; do args+=("${a//@RESULT@/$result}"); done
  log "$name: start (slot ${slot}s): ${args[*]}"
  local t0=$(date +%s)
  timeout --kill-after=10 "$slot" "${args[@]}" >>"$LOG" 2>&1
  local rc=$? seconds=$(($(date +%s) - t0))
  log "$name: exit $rc after ${seconds}s"
  "$PY" - "$name" "$rc" "$seconds" "$result" "$record" "${args[*]}" <<'EOF'
import json, sys
from pathlib import Path
name, rc, seconds, result, record, cmd = sys.argv[1:]
data = None
if Path(result).is_file():
    try:
        data = json.loads(Path(result).read_text())
    except ValueError as exc:
        data = f"unreadable: {exc}"
Path(record).write_text(json.dumps({"check": name, "command": cmd, "exit": int(rc), "seconds": int(seconds),
                                    "timed_out": int(rc) in (124, 137), "result": data}))
EOF
  merge
}
N=0

# -- environment ----------------------------------------------------------------------------
if ! "$PY" -c "import webdataset, braceexpand" 2>/dev/null; then
  for dir in "${WHEELS:-}" shared/wheels ../shared/wheels .whl; do
    if [[ -n "$dir" ]] && ls "$dir"/webdataset-*.whl >/dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$dir"/webdataset-*.whl \
        "$dir"/braceexpand-*.whl >>"$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:$WORK/site"
      break
    fi
  done
fi
"$PY" - >"$WORK/env.json" 2>>"$LOG" <<'EOF'
import json, os, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
        "cpus": os.cpu_count()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
try:
    import webdataset, braceexpand  # noqa: F401
    info["webdataset"] = webdataset.__version__
except ImportError as exc:
    info["webdataset"] = f"missing: {exc}"
print(json.dumps(info))
EOF
cp "$WORK/env.json" "$WORK/results/00-env.json"
merge
log "environment: $(cat "$WORK/env.json")"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

# -- sizes ----------------------------------------------------------------------------------
CACHE="${COMPILE_CACHE:-$WORK/compile-cache}"  # one compile cache for the session: check 2 fills it, check 4 reads it
BENCH=(bench/train_throughput.py --config sketchycoco-256 --workers 4 --compile-cache "$CACHE")
PREC=(--precision bf16 --channels-last)
STEPS=(--steps 10 --warmup 3)
B8=8 B16=16 B32=32
if ((DRY)); then  # the CPU path of every step: the demo preset shrunk, one step
  BENCH=(bench/train_throughput.py --config demo --workers 0 --threads 1 --compile-cache "$CACHE")
  PREC=(--precision bf16)
  STEPS=(--steps 1 --warmup 1)
  B8=2 B16=2 B32=2
  TINY=(model.image_size=32 model.ngf=4 model.ndf=8 model.spade_hidden=8 model.z_dim=16 model.sfm_hidden=4)
else
  TINY=()
fi

# -- the checks -----------------------------------------------------------------------------
check eager-bf16-b8 120 "$PY" "${BENCH[@]}" "${PREC[@]}" "${STEPS[@]}" --batch "$B8" --variants ssgan \
  --json @RESULT@ "${TINY[@]}"
check compiled-bf16-b8-cold 200 "$PY" "${BENCH[@]}" "${PREC[@]}" "${STEPS[@]}" --batch "$B8" \
  --variants ssgan-compiled --json @RESULT@ "${TINY[@]}"
check eager-bf16-b16 70 "$PY" "${BENCH[@]}" "${PREC[@]}" "${STEPS[@]}" --batch "$B16" --variants ssgan \
  --json @RESULT@ "${TINY[@]}"
check eager-bf16-b32 80 "$PY" "${BENCH[@]}" "${PREC[@]}" "${STEPS[@]}" --batch "$B32" --variants ssgan \
  --json @RESULT@ "${TINY[@]}"
check compiled-bf16-b8-warm 90 "$PY" "${BENCH[@]}" "${PREC[@]}" "${STEPS[@]}" --batch "$B8" \
  --variants ssgan-compiled --json @RESULT@ "${TINY[@]}"
check fp16-b8 60 "$PY" "${BENCH[@]}" --precision fp16 "${STEPS[@]}" --batch "$B8" --variants ssgan \
  --json @RESULT@ "${TINY[@]}"
check fp16-run 60 "$PY" -m ssgan_dist.train train.precision=fp16 train.max_steps=$((DRY ? 2 : 30)) \
  train.progress=false train.log_every=10 run.dir="$WORK/fp16-run" data.num_workers=0 "${TINY[@]}"
check compiled-equals-eager 150 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_compile.py \
  -k matches_eager --junitxml="$WORK/junit.xml"
if ((GPUS >= 2)); then
  check nccl-2gpu-bf16-compressed 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m ssgan_dist.train train.precision=bf16 train.max_steps=20 train.progress=false \
    engine.grad_compression=bf16 run.dir="$WORK/nccl-run"
else
  log "nccl-2gpu: skipped, $GPUS GPU(s)"
fi

# -- summary --------------------------------------------------------------------------------
merge
"$PY" - "$OUT/results.json" <<'EOF' | tee -a "$LOG"
import json, sys
rows = json.load(open(sys.argv[1]))
print(f"{'check':28} {'exit':>4} {'s':>4}  result")
for r in rows:
    if "check" not in r:
        print("env", r)
        continue
    res = r.get("result")
    if isinstance(res, list) and res and isinstance(res[0], dict):
        x = res[0]
        mfu = x.get("mfu_with_vgg")
        res = (f"{x['images_per_s']:.1f} img/s, step {1e3 * x['step_s']:.1f} ms, "
               f"MFU+VGG {100 * mfu:.1f}%" if mfu is not None else "") + \
              (f", peak {x['max_memory_allocated_bytes'] / 2**30:.1f} GiB" if x.get("max_memory_allocated_bytes") else "") + \
              (f", compile {x['compile_s']:.0f} s" if x.get("compile_s") is not None else "")
    print(f"{r['check']:28} {r.get('exit', '-'):>4} {r.get('seconds', '-'):>4}  {r.get('skipped') or res or ''}")
EOF
log "done in $(($(date +%s) - START))s; results: $OUT/results.json"
