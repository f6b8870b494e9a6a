#!/usr/bin/env bash
# One prepared GPU benchmark: items 1-3 of benchmarks/run.py (input pipeline, training step
# with XLA and bf16/f16 on and off, Keras vs PyTorch, MFU against the bf16 and f32 matmul
# peak, inference of a full 385 x 512 x 512 phantom through every Keras segmenter, the
# cascade and nnU-Net with and without mirroring) sized to finish within ~5 minutes on one
# CUDA GPU, then a short table. GPU time is scarce: one run says everything.
#
#   benchmarks/gpu.sh                         # on the CUDA machine
#   BENCH_DEVICE=cpu benchmarks/gpu.sh --dry-run   # same code paths, tiny sizes, on a CPU
#
# Results: benchmarks/results/gpu.json (or gpu-dryrun.json). Exit status 1 if a case failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
MODE=gpu
OUT=benchmarks/results/gpu.json
if [ "${1:-}" = "--dry-run" ]; then
    MODE=tiny
    OUT=benchmarks/results/gpu-dryrun.json
fi
if [ "${BENCH_DEVICE:-cuda}" = "cpu" ]; then
    export CUDA_VISIBLE_DEVICES=""
else
    # Each framework, with its wing's interpreter, must see the GPU: a benchmark that quietly
    # falls back to the CPU measures nothing (docs/gpu.md). The doctor's report heads the log.
    if ! "$PY" cli.py doctor --require-gpu; then
        echo "gpu.sh: stopped: a framework would run on the CPU (see the error lines above); for a CPU dry run use BENCH_DEVICE=cpu benchmarks/gpu.sh --dry-run" >&2
        exit 1
    fi
fi
export TF_FORCE_GPU_ALLOW_GROWTH=true   # TF and torch run in turns; never let TF grab all memory
echo "gpu.sh: mode $MODE, results $OUT"
exec timeout 1200 "$PY" benchmarks/run.py --mode "$MODE" --only pipeline,train,infer --json "$OUT"
