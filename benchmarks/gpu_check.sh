#!/usr/bin/env bash
# The GPU check: one command, on a machine with one NVIDIA GPU, for the CUDA tests and the GPU figures.
set -uo pipefail

usage() {
  cat <<'USAGE'
usage: bash benchmarks/gpu_check.sh [--quick] [--help]

On a machine with one NVIDIA GPU, in under 8 minutes, from the repository root:
  1. the CUDA-marked tests (pytest -m cuda: tests/test_cuda.py): training with Cutout, Mixup,
     StochasticDepth and WeightPenalty under bf16-mixed and 16-mixed autocast, NCHW and channels-last;
     Cutout drawing on the batch's device; TTA on the GPU against the CPU result; fold_batch_norm on
     the GPU against the unfolded model; DDP over NCCL on one GPU;
  2. the GPU figures, each written to its own section of benchmarks/RESULTS.md:
     gpu-step        training-step time with Cutout, Mixup, StochasticDepth (batch mode) vs plain,
                     ResNet-56, batch 128, 3x32x32
     gpu-tta         TTA cost per view (hflip, hflip x vflip, translate) and ten-crop vs ttach if installed
     gpu-ensemble    Ensemble evaluation: vmap fast path vs the plain loop over members
     gpu-bn_folding  inference time with BatchNorm folded vs unfolded (zoo, torchvision, timm models)

--quick runs each benchmark as a smoke run (sections end in -quick; not figures).
PYTHON (default python3) must have torch with CUDA, lightning, timm, torchmetrics and scikit-learn;
the package is used from this checkout (PYTHONPATH), nothing is installed or downloaded.
Logs go to $OUT if set (the device tool's output folder), else /tmp/gpu_check.
Without a GPU it prints one line and exits with status 1, running nothing.
USAGE
}

quick=()
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --quick) quick=(--quick) ;;
    *) echo "gpu_check: unknown argument '$arg' (expected --quick or --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no NVIDIA GPU found (torch.cuda.is_available() is False in $PY); nothing was run."
  exit 1
fi
LOGS=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGS"
"$PY" -c "import torch; print('gpu_check on', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

failed=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "gpu_check: $name exited $rc after $((SECONDS - start)) s (log: $LOGS/$name.log)"
  tail -n 3 "$LOGS/$name.log"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

step tests 180 "$PY" -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider
step gpu-step 120 "$PY" -m benchmarks step --accelerator gpu --backbone resnet56 --batch-size 128 \
  --callback lightning_tricks.Cutout --callback lightning_tricks.Mixup --callback lightning_tricks.StochasticDepth \
  --section gpu-step "${quick[@]}"
step gpu-tta 60 "$PY" -m benchmarks tta --device cuda --no-memory --batch-size 256 --section gpu-tta "${quick[@]}"
step gpu-ensemble 90 "$PY" -m benchmarks ensemble --device cuda --section gpu-ensemble "${quick[@]}"
step gpu-bn_folding 45 "$PY" -m benchmarks bn_folding --device cuda --batch-size 256 --section gpu-bn_folding \
  "${quick[@]}"
cp benchmarks/RESULTS.md "$LOGS/RESULTS.md" 2>/dev/null

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all passed; figures in benchmarks/RESULTS.md (copy in $LOGS/RESULTS.md)"
