#!/usr/bin/env bash
# The GPU check, in one go: the gpu-marked tests, then the benchmark matrix
#   ResNet50, AMP bf16, channels_last, batch 256 per GPU;
#   PIL with as many workers as cores  vs  DALI mixed (GPU decode)  vs  DALI CPU decode;
#   loader, train and synthetic ceiling.
# Writes logs and JSON to OUTDIR. Every knob below can be overridden from the environment,
# e.g. ARCH=resnet18 BATCH=8 IMAGE_SIZE=64 ITERS=2 for a smoke run on a CPU-only machine.
#
#   bash benchmarks/gpu_suite.sh OUTDIR
set -uo pipefail
out=${1:?usage: gpu_suite.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
ARCH=${ARCH:-resnet50}
BATCH=${BATCH:-256}
IMAGE_SIZE=${IMAGE_SIZE:-224}
AMP=${AMP:-bf16}
WORKERS=${WORKERS:-$(nproc)}
WARMUP=${WARMUP:-10}
ITERS=${ITERS:-20}
REPEATS=${REPEATS:-3}
LIST=${LIST:-}
status=0

{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
  $py -c "import torch, nvidia.dali as d; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'dali', d.__version__)"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

echo "== gpu tests"
$py -m pytest -m gpu -v -p no:cacheprovider tests > "$out/gpu_tests.log" 2>&1 || status=1
tail -n 25 "$out/gpu_tests.log"

bench() {  # name, then extra flags
  local name=$1; shift
  echo "== benchmark: $name"
  $py benchmarks/throughput.py ${LIST:+--list "$LIST"} --arch "$ARCH" --batch-size "$BATCH" \
    --image-size "$IMAGE_SIZE" --amp "$AMP" --workers "$WORKERS" --warmup "$WARMUP" \
    --iters "$ITERS" --repeats "$REPEATS" --json "$out/$name.json" "$@" \
    > "$out/$name.log" 2>&1 || status=1
  tail -n 12 "$out/$name.log"
}
# PIL and DALI (mixed decode under auto on CUDA) side by side in one process, then CPU decode.
bench pil_vs_dali_mixed --backends pil,pil-gpu,dali --modes loader,train,synthetic --dali-decode auto
bench dali_cpu_decode --backends dali --modes loader,train --dali-decode cpu
exit $status
