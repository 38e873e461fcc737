#!/usr/bin/env bash
# The GPU check in one call, at most 9.5 minutes on an H100 with 16 cores (560 s of limits);
# every stage under its own `timeout`, most valuable first, so a cut run still leaves what it
# measured (the benchmark rewrites its JSON after every row; logs stream to OUTDIR):
#   1. trainer  trainer/main.py with every feature on (benchmarks/trainer_check.py): one GPU,
#               mixed decode, auto-augment, mixup + cutmix, EMA, accumulation, clipping,
#               progressive resize, step checkpoints, under torch's sync debug mode; stopped by
#               SIGTERM mid-epoch 2 and resumed to the end. Host syncs per step and where,
#               pipeline build seconds and device memory at each epoch boundary.
#   2. table    resnet50, bf16, channels_last, batch 256/GPU, one process: pil and pil-gpu with
#               every core as workers, DALI with the trainer's defaults (no flags), DALI tuned
#               (mixed, hw_decoder_load 0.99, 8 threads), DALI cpu decode with every core; loader,
#               train, synthetic ceiling; epoch-boundary cost of each loader. A row whose
#               settings equal the defaults' (cpu decode with 16 cores, mixed/8 threads with
#               8-15) is measured once, as `dali`.
#   3. tests    the gpu-marked tests
#   4. shards   the same images as a tar shard set (tools/make_shards.py of SHARD_LIST: the demo
#               train list, or LIST when given): DALI with the trainer's defaults, loader and
#               train, against its ceiling (issue 18's target: within 2% of it)
#   5. small    SMALL_ARCH (resnet18): DALI mixed (tuned) against cpu decode, loader and train,
#               and its ceiling: does cpu decode keep up with a small model?
#   6. sweep    throughput.py --sweep, small grid (mixed,cpu x 0.8,0.99 x 8,cores x prefetch 2)
#   7. compile  DALI defaults with --compile (compare with the table's dali train row: no compile)
# Measured on a LIST_ENTRIES-line list repeating the demo train files (written to OUTDIR), so
# every loader's warm-up and windows lie in one epoch. nvidia-smi dmon runs alongside
# (dmon.txt: its jpg column is the hardware JPEG decoder). summary.md gathers the figures.
# SKIP_STAGES="name ...": stages not run (marked skipped in the summary, not a failure).
#
#   bash benchmarks/gpu_suite.sh OUTDIR
# Smoke run on a CPU-only machine (mixed-decode rows are skipped there; compile is skipped: a
# CPU compile of the model takes minutes), about 3-4 minutes on 2 cores, exit 0:
#   PYTHON=.venv/bin/python ARCH=resnet18 BATCH=4 IMAGE_SIZE=32 WARMUP=1 ITERS=2 REPEATS=2 \
#     BOUNDARIES=1 LIST_ENTRIES=800 TRAINER_STEPS=16 TRAINER_VAL=16 SKIP_STAGES=compile \
#     bash benchmarks/gpu_suite.sh /tmp/suite
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
ARCH=${ARCH:-resnet50}
BATCH=${BATCH:-256}
IMAGE_SIZE=${IMAGE_SIZE:-224}
AMP=${AMP:-bf16}
CORES=${CORES:-$(nproc)}
TUNED_THREADS=${TUNED_THREADS:-8}
WARMUP=${WARMUP:-10}
ITERS=${ITERS:-20}
REPEATS=${REPEATS:-3}
BOUNDARIES=${BOUNDARIES:-3}
LIST_ENTRIES=${LIST_ENTRIES:-25600}
LIST=${LIST:-}
SMALL_ARCH=${SMALL_ARCH:-resnet18}
TRAINER_STEPS=${TRAINER_STEPS:-40}  # batches per epoch of the trainer stage's 2 epochs
TRAINER_VAL=${TRAINER_VAL:-1024}
SKIP_STAGES=${SKIP_STAGES:-}
# Seconds per stage: 30 + 110 + 120 + 100 + 30 + 40 + 50 + 40 + 40 = 560 at most, with the
# start-up under the device's 10 minutes a call.
T_DATA=${T_DATA:-30}
T_TRAINER=${T_TRAINER:-110}
T_TABLE=${T_TABLE:-120}
T_TESTS=${T_TESTS:-100}
T_SHARD_DATA=${T_SHARD_DATA:-30}
T_SHARDS=${T_SHARDS:-40}
T_SMALL=${T_SMALL:-50}
T_SWEEP=${T_SWEEP:-40}
T_COMPILE=${T_COMPILE:-40}
status=0
start=$SECONDS

stage() {  # name, seconds, command...: runs it under timeout, logs to OUTDIR/name.log
  local name=$1 limit=$2; shift 2
  if [[ " $SKIP_STAGES " == *" $name "* ]]; then
    echo "== $name skipped (SKIP_STAGES)"
    printf '%s\tskipped\t0\tSKIP_STAGES\n' "$name" >> "$out/stages.tsv"
    return
  fi
  echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
  local began=$SECONDS
  timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    status=1
    echo "   $name: exit $rc$([ $rc -eq 124 ] && echo ' (cut by its time limit)')"
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - began))" >> "$out/stages.tsv"
  tail -n 30 "$out/$name.log"
}

# A rerun into the same OUTDIR: no earlier run's figures may pass for this one's (a stage cut
# before its first row writes no JSON at all).
rm -rf "$out"/{table,sweep,compile,small,shards}.json "$out/best_loader.toml" \
  "$out/stages.tsv" "$out/summary.md" "$out/trainer" "$out/shards"

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
  $py -c "import torch, nvidia.dali as d; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'dali', d.__version__)"
  echo "cores: $CORES"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
cuda=$($py -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

if command -v nvidia-smi > /dev/null; then
  nvidia-smi dmon -s u -d 1 > "$out/dmon.txt" 2>&1 &
  dmon_pid=$!
  trap 'kill "$dmon_pid" 2> /dev/null' EXIT
fi

if [ -z "$LIST" ]; then
  LIST="$out/train_${LIST_ENTRIES}.txt"
  # The shards stage's set: the demo train images, each once (the list repeats them).
  SHARD_LIST=${SHARD_LIST:-$($py -c "from pipelines.demo import default_demo_root as r; print(r())")/Train.txt}
  stage data "$T_DATA" $py - "$LIST" "$LIST_ENTRIES" << 'EOF'
import os, shutil, sys
from pipelines.demo import default_demo_root, ensure_demo_data
from pipelines.lists import read_list, write_list
demo = ensure_demo_data(default_demo_root(), preset="default")
samples = read_list(demo.train_list)
target, entries = sys.argv[1], int(sys.argv[2])
write_list(target, (samples[i % len(samples)] for i in range(entries)), absolute=True)
shutil.copy(os.path.join(os.path.dirname(demo.train_list), "classes.txt"), os.path.dirname(target))
print(f"{target}: {entries} entries repeating the {len(samples)} demo train images")
EOF
fi

# The measurement's settings; each stage adds its list and model.
timing=(--batch-size "$BATCH" --image-size "$IMAGE_SIZE" --amp "$AMP" --warmup "$WARMUP"
  --iters "$ITERS" --repeats "$REPEATS")
common=(--list "$LIST" --arch "$ARCH" "${timing[@]}")
if [ "$cuda" = 1 ]; then
  tuned="dali:decode=mixed:hw=0.99:threads=$TUNED_THREADS"
  sweep_decode=mixed,cpu
else
  tuned=""  # mixed decode needs a GPU
  sweep_decode=cpu
  echo "no CUDA: mixed-decode rows skipped"
  printf 'mixed-decode rows\tskipped\t0\tno CUDA on this machine\n' >> "$out/stages.tsv"
fi
stage trainer "$T_TRAINER" $py benchmarks/trainer_check.py --list "$LIST" --out "$out/trainer" \
  --arch "$ARCH" --batch-size "$BATCH" --image-size "$IMAGE_SIZE" --amp "$AMP" \
  --steps-per-epoch "$TRAINER_STEPS" --val-images "$TRAINER_VAL" --timeout "$((T_TRAINER * 2 / 3))"

table="pil:threads=$CORES,pil-gpu:threads=$CORES,dali${tuned:+,$tuned},dali:decode=cpu:threads=$CORES"
stage table "$T_TABLE" $py benchmarks/throughput.py "${common[@]}" --backends "$table" \
  --modes loader,train,synthetic --boundaries "$BOUNDARIES" --json "$out/table.json" --overwrite

# pytest may be missing from the GPU machine's image: install the wheels of
# benchmarks/gpu_kit.sh (carried as .gpu/py) into /tmp, outside the repo copy.
if ! $py -c "import pytest" 2> /dev/null && ls .gpu/py/*.whl > /dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --target /tmp/gpu_pytest .gpu/py/*.whl \
    && export PYTHONPATH="/tmp/gpu_pytest${PYTHONPATH:+:$PYTHONPATH}"
fi
if $py -c "import pytest" 2> /dev/null; then
  # -v: a line per test as it ends, so a run cut by its limit still says which passed.
  stage gpu_tests "$T_TESTS" $py -m pytest -m gpu -v --durations=10 -p no:cacheprovider tests
else
  status=1
  echo "== gpu_tests skipped: no pytest here (bash benchmarks/gpu_kit.sh, then carry .gpu/py)"
  printf 'gpu_tests\tskipped\t0\tno pytest on this machine\n' >> "$out/stages.tsv"
fi

# The table's images as a shard set, read as the trainer reads one (throughput.py repeats a
# set to the windows it needs, as it does a short list).
if [[ " $SKIP_STAGES " == *" shards "* ]]; then
  stage shards 0 true  # marked skipped
else
  stage shard_data "$T_SHARD_DATA" $py tools/make_shards.py "${SHARD_LIST:-$LIST}" \
    --out-dir "$out/shards" --shard-size 64MB
  stage shards "$T_SHARDS" $py benchmarks/throughput.py --list "$out/shards" --arch "$ARCH" \
    "${timing[@]}" --backends dali --modes loader,train,synthetic --boundaries 0 \
    --json "$out/shards.json" --overwrite
fi

small="dali:decode=cpu:threads=$CORES${tuned:+,$tuned}"
stage small "$T_SMALL" $py benchmarks/throughput.py --list "$LIST" --arch "$SMALL_ARCH" \
  "${timing[@]}" --backends "$small" --modes loader,train,synthetic --boundaries 0 \
  --json "$out/small.json" --overwrite

stage sweep "$T_SWEEP" $py benchmarks/throughput.py --sweep --list "$LIST" --arch "$ARCH" \
  --batch-size "$BATCH" --image-size "$IMAGE_SIZE" --amp "$AMP" --sweep-decode "$sweep_decode" \
  --sweep-hw-decoder-load 0.8,0.99 --sweep-threads "$TUNED_THREADS,$CORES" --sweep-prefetch 2 \
  --json "$out/sweep.json" --toml "$out/best_loader.toml" --overwrite

stage compile "$T_COMPILE" $py benchmarks/throughput.py "${common[@]}" --backends dali \
  --modes train,synthetic --boundaries 0 --compile --json "$out/compile.json" --overwrite

$py -m benchmarks.report "$out" > "$out/summary.md" 2>&1 || status=1
cat "$out/summary.md"
echo "suite: $((SECONDS - start)) s, exit $status"
exit $status
